"""Where content comes from, in the order the registry asks: this node's containerd, the
node's in-flight fetches, peers, upstream (`chain`), and what a tag means (`tags`)."""
