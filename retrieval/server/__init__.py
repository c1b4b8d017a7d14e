"""`seesay serve`: the HTTP API, thumbnails and search page (`retrieval.server.app.create_app`)."""
