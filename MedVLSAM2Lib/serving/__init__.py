"""Remote inference: the wire protocol, the HTTP server and its client."""
