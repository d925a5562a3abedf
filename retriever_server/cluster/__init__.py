"""Where the servers run: local processes, or Ray actors on a cluster.

- `launcher`: every shard (x replicas) and a router as local processes (`LocalDeployment`);
- `supervisor`: those processes restarted with backoff, on their ports, when they exit, and ended
  when their parent dies; `uninterrupted`, a cleanup that no second Ctrl-C or SIGTERM cuts short;
- `ray_serving`: the same as named Ray actors on a cluster (`RayDeployment`, `lookup`, `undeploy`);
- `ray_actors`: the shard replica and router actors, and `stop_actors` (drained, then killed);
- `placement`: which node each replica goes to;
- `connect`: joining a Ray cluster the same way for every job, failing fast when it is not there;
- `reaper`: a local Ray cluster a command started, ended when the command dies, however it dies;
- `cpus`: pinning a process to cores;
- `hop_credentials`: the CA, certificates and token a deployment makes for its own hops;
- `ray_security`, `ray_secrets`: how a Ray deployment secures its ports, and its actors' secrets carried
  as constructor arguments (never in a runtime environment, which Ray logs).

Imports: retriever_server.cluster, retriever_server.serving, retriever_server.security,
    retriever_server.datastore.manifest, retriever_server.wire.request, retriever_server.wire.untrusted,
    retriever_server.logs
"""
