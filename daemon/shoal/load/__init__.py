"""`shoal load`: image archives into the node's containerd, verified, named and shareable."""
