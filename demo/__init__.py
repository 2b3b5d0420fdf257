"""The demo's own pieces: a loopback photo site for the crawl and the report writer."""
