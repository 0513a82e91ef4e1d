# ACL policy of `pathagent run` on ONE gateway (Consul 1.8). One policy per gateway: replace @NODE@ by the
# gateway's node name (docs/consul.md, "ACLs"), and "pathagent/" by "<[consul] prefix>/" if you changed it.
# Its token goes into that gateway's [consul] token_file; the guard (watchdog) uses the same config.
# Checked rule by rule by tests/consul/test_consul_configs.py: without any one of these the agent cannot run.

# every key of the layout (docs/keys.md): path locks, node record, leader, fence records, moves, logins
key_prefix "pathagent/" {
  policy = "write"
}

# its iSCSITarget session: create, info (the confirmations), renew, destroy, list of this node's sessions
session "@NODE@" {
  policy = "write"
}

# the pathagent-alive TTL check is a node-level check of the local agent: register and pass it
node "@NODE@" {
  policy = "write"
}

# /v1/agent/self: the local Consul agent's node name, which must be [node] name
agent "@NODE@" {
  policy = "read"
}
