"""Who may talk to the servers, and how.

- `config`: `ServerSecurity` and `ClientSecurity`, the safe default (no unprotected non-loopback
  port), token files;
- `tls`: TLS credentials for servers (reloaded when their files change) and channels;
- `auth`: bearer tokens checked in constant time by a server interceptor (health stays open);
- `client_files`: a long-lived client's token and TLS files read again when they change (a router's);
- `certs`: a private CA and the certificates it signs, for a deployment's own hops.

Imports: retriever_server.security, retriever_server.logs
"""
