"""The pipeline: every stage on one corpus into one run folder, resumable (`lm-worker pipeline`, `demo`).

- `config`: sizes of every stage (`PipelineConfig`, with the demo's and the quick demo's);
- `stages`: each stage's time, and whether its output was reused;
- `data_stage`, `model_stage`, `datastore_stage`, `eval_stage`: the stages, in order;
- `staleness`: on a rerun, what an earlier run made from another LM, encoder or window, or a model trained
  with other settings, refused at once;
- `run`: `run_pipeline` and the report.

Imports: lm_worker, retriever_server.cluster.connect, retriever_server.cluster.launcher,
    retriever_server.cluster.ray_serving
"""
