// Package test holds the suites that exercise Tandem from the outside:
// test/envtest runs the VolumePair API against a real kube-apiserver and etcd
// built into bin/; test/invalid holds manifests the API server must refuse;
// test/e2e runs the user stories on the local cluster.
package test
