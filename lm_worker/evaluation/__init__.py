"""Evaluation: kNN-LM scoring and perplexity of the LM, kNN-LM and RETRO, in one process or many.

- `knnlm`: p = λ·p_kNN + (1-λ)·p_LM from neighbours' distances and values (also used in decoding);
- `config`: `EvalConfig` and perplexity;
- `batches`: the sliding windows an evaluation scores, in batches;
- `knnlm_eval`: the LM alone and kNN-LM over a sweep of λ (`evaluate_knnlm`);
- `pointers`: approximate kNN-LM retrieval that follows the previous position's neighbours (RetoMaton);
- `retro_eval`: RETRO with and without its neighbours (`evaluate_retro`);
- `distributed`: the same evaluations cut into shares over LM worker actors on Ray;
- `eval_worker`: one of those actors (`EvalWorker`);
- `shares`: those shares, and the folder that keeps the finished ones for a rerun;
- `combine`: the shares' results added up into one;
- `report`: table.md, eval.json and the perplexity-against-λ plot;
- `attention_plot`: which neighbour tokens a RETRO chunk attends to.

Evaluation takes a retriever object (`lm_worker.retrieval`); only the distributed workers open one.

Imports: lm_worker.evaluation, lm_worker.data, lm_worker.models, lm_worker.encoders.registry,
    lm_worker.sources.exclusions, lm_worker.retrieval, retriever_server.cluster.connect
"""
