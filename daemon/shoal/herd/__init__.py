"""Spreading one blob through a herd of pulling nodes as a tree (README, "A herd of hundreds")."""
