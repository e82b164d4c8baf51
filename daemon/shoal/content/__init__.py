"""What content is (Descriptor, Blob, Source), and the one way shoal verifies it while streaming."""
