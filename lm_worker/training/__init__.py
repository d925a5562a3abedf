"""Training the base LM and RETRO on a prepared corpus.

- `config`: `TrainConfig`, `TrainReport`, presets and the learning-rate schedule;
- `batches`: training and held-out windows, with RETRO's precomputed neighbours;
- `retrofit`: RETRO whose decoder is the trained LM, frozen (retro-fitting);
- `train`: the training loop, resumable from its checkpoint;
- `loss_plot`: the loss curves as a PNG.

Imports: lm_worker.training, lm_worker.data, lm_worker.models
"""
