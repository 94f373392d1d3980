"""The web layer: the ASGI app, the request path, admin routes and process duties."""
