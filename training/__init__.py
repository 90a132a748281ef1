"""PyTorch side of mae-deploy: the MAE model, checkpoint formats, data, pretraining, fine-tuning."""
