"""The adversarial core: objectives, penalties, the training loop. Knows nothing about images."""
