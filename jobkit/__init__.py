"""Job plumbing shared by the Ray jobs (pipelines/, training/, inference/): the command-line front (args.py) and
the `vosr` console script (cli.py). It may import Ray; the method library (vosr/) never imports it."""
