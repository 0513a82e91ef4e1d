"""Lab building blocks for tests, benchmarks and the demo: real Consul, Ceph, tgtd and namespaces."""
