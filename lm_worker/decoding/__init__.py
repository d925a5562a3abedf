"""Decoding: greedy, top-k / top-p sampling and beam search over steppers that retrieve.

- `stepper`: the stepper protocol (a model, its cache, its retrieval, one token at a time);
- `config`: `GenerateConfig` and `GenerateOutput`;
- `sampling`, `beam`: the strategies; `generate`: the decode loop and its entry point;
- `stepper_stats`: where a stepper's time goes, retrievals in flight;
- `lm_stepper`, `knnlm_stepper`, `retro_stepper`: the plain LM, kNN-LM (every token), RETRO (every chunk);
- `speculative`: kNN-LM computing the next step on a guess while neighbours are in flight;
- `ralmspec` (a package): kNN-LM guessing neighbours from each sequence's local cache, verified in
  batches, rolled back row by row (RaLMSpec);
- `pipelined`: prompt groups interleaved so one group's retrieval overlaps another's compute.

Steppers take a retriever object and see neighbours as arrays.

Imports: lm_worker.decoding, lm_worker.evaluation.knnlm, lm_worker.retrieval.config
"""
