# ACL policy of the pathagent CLI (disk, path, paths, nodes, node drain/undrain, status), Consul 1.8.
# Replace "pathagent/" by "<[consul] prefix>/" if you changed the prefix. Its token goes into the
# [consul] token_file of the config the CLI reads (docs/consul.md, "ACLs"), not the agent's.

# disk records, path keys, claims, moves, drain flags; reads of node records, fence records and logins
key_prefix "pathagent/" {
  policy = "write"
}

# its own short sessions on the node it runs on (disk commands, path move), the owners' sessions it
# reads (paths, status) and, in `disk stop`, destroys when an owner does not let go
session_prefix "" {
  policy = "write"
}

# /v1/agent/self: the name of the node it runs on (its sessions are made there)
agent_prefix "" {
  policy = "read"
}
