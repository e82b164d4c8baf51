"""`shoal preheat`: an image spread to some nodes before a rollout, kept until kubelets pull it."""
