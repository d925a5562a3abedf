"""Ray jobs of the LM side: the encode job, a datastore source written in parts by Ray Data actors.

- `encode_plan`: what the job encodes and how the rows are cut into parts;
- `encode_worker`: the actor that loads the model once and writes one part per call;
- `encode_job`: the driver: keeps finished parts, runs the rest, publishes the source.

Imports: lm_worker.jobs, lm_worker.data, lm_worker.models, lm_worker.encoders, lm_worker.sources,
    retriever_server.cluster.connect, retriever_server.datastore.row_parts, retriever_server.datastore.publish
"""
