// Package deploy holds what operators deploy imd with: systemd units
// (systemd/), Kubernetes manifests (k8s/) and a Grafana dashboard
// (grafana/); deploy/README.md says how to use them. It has no code: its
// tests check those files against the imd they deploy (the flags and
// config keys they use, the Kubernetes API schema, the metrics the
// dashboard queries).
package deploy
