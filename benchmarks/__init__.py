"""Benchmarks: each script runs alone (`PYTHONPATH=$PWD .venv/bin/python benchmarks/<name>.py --help`). A regular
package, so that `benchmarks.<module>` resolves here before any installed package of the same name (fairscale, a
test extra, ships a top-level `benchmarks`)."""
