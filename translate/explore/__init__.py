"""Looking into a trained latent GAN: sample grids, latent walks and arithmetic, inversion,
and the curves of a run's log (plot)."""
