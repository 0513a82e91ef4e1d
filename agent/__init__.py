"""iscsi-path-agent: serves Ceph RBD images over iSCSI from a group of gateways, with path locks in Consul."""
