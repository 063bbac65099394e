"""Real-Kubernetes end-to-end harness: etcd, kube-apiserver and kube-scheduler on loopback."""
