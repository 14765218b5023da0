package envtest

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"k8s.io/apimachinery/pkg/api/equality"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/csi/csifake"
)

// TestCSISanity runs the CSI conformance suite (kubernetes-csi/csi-test's
// csi-sanity) against the driver's identity, controller and node services,
// with the test API server behind them and two Ready Nodes whose agents'
// Leases are current. No VolumePair controller runs: volumes are the
// VolumePair objects. The node service attaches and mounts through the
// in-memory twins of package csifake (the real attach is tested on the
// local cluster).
func TestCSISanity(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	nodes := []string{"csi-sanity-a", "csi-sanity-b"}
	readyNodes(t, ns, "107374182400", nodes...)

	// No VolumePair controller runs: stand in for its writer, which
	// reports the client nodes it enforces (status.clients) once told.
	go mirrorClients(ctx, t, ns)

	dir := t.TempDir()
	devDir := filepath.Join(dir, "dev")
	if err := os.MkdirAll(devDir, 0o700); err != nil {
		t.Fatal(err)
	}
	controller := &csi.Controller{Client: k8s, Namespace: ns, PublishWait: 5 * time.Second}
	// As the node plugin runs it: it fences the volume to its node when it
	// stages it.
	node := &csi.Node{NodeID: nodes[0], Client: k8s, Namespace: ns,
		Attacher: &csifake.Attacher{Dir: devDir}, Mounter: &csifake.Mounter{}, StateDir: filepath.Join(dir, "state"),
		Publisher: &csi.Controller{Client: k8s, Namespace: ns, PublishWait: 5 * time.Second},
		// No agents grow replicas here: every member serves spec.size.
		ServedSize: func(ctx context.Context, key client.ObjectKey) (int64, error) {
			vp := &v1.VolumePair{}
			if err := k8s.Get(ctx, key, vp); err != nil {
				return 0, err
			}
			return vp.Spec.Size.Value(), nil
		}}
	sock := filepath.Join(dir, "csi.sock")
	ln, err := csi.Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- csi.Serve(ctx, ln, csi.Services{
			Identity:   &csi.Identity{Controller: true, Version: "sanity"},
			Controller: controller, Node: node,
		}, testr.New(t))
	}()

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.IdempotentCount = 2
	sanity.Test(t, cfg)

	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	// Every volume the suite created it also deleted.
	var left v1.VolumePairList
	if err := k8s.List(context.Background(), &left); err == nil {
		for _, vp := range left.Items {
			if vp.Namespace == ns {
				t.Errorf("VolumePair %s/%s left behind", vp.Namespace, vp.Name)
			}
		}
	}
}

// mirrorClients copies every VolumePair's spec.clients to its
// status.clients in ns, as the writer's agent would report them, until ctx
// ends.
func mirrorClients(ctx context.Context, t *testing.T, ns string) {
	for ctx.Err() == nil {
		var l v1.VolumePairList
		if err := k8s.List(ctx, &l, client.InNamespace(ns)); err == nil {
			for i := range l.Items {
				vp := &l.Items[i]
				if equality.Semantic.DeepEqual(vp.Spec.Clients, vp.Status.Clients) {
					continue
				}
				vp.Status.Clients = vp.Spec.Clients.DeepCopy()
				_ = k8s.Status().Update(ctx, vp)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}
