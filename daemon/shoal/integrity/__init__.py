"""The node's own blob files: which were hashed in full and matched (`ledger`), how one is sent
(`files`: by sendfile() alone once verified, else hashed while it is sent), quarantine of a
digest whose file did not match (`guard`), and the background re-hash of recorded files
(`scrub`)."""
