"""Who may ask this node, and what it may share (README, "Private images stay private").

`keys` derives the cluster's separate keys from one secret; `tokens` signs and checks peer
requests and redirect capabilities; `signer` is the client side peers call; `admission` is the
pull API's first middleware. `status` learns whether a repository's registry serves content
anonymously, `policy` holds the opt-in sharing rules, `access` decides per digest and tag,
`gate` applies it to Sources, `credentialed` is the upstream with configured credentials (this
node's containerd only), `refusals` counts and logs every refusal.
"""
