"""The demo: the whole chain on the embedded tiny preset (chain.py, `python -m demo`), its loopback photo site
for the crawl (photo_server.py) and its report (report.py)."""
