package envtest

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	csispec "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/csi/csifake"
)

// TestCSINodeFence: with no attach step (the CSIDriver's attachRequired is
// false) the node plugin fences a volume to its node when it stages it.
// Two nodes stage the same volume at once: one wins, and only once the
// writer enforces it (a stand-in reports status.clients); the other is
// refused with FailedPrecondition naming the winner, and may stage it once
// the winner has unstaged it. A stage that fails with a final error leaves
// no fence behind (the kubelet does not unstage it).
func TestCSINodeFence(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	readyNodes(t, ns, "10737418240", "nf-a", "nf-b")
	go mirrorClients(ctx, t, ns)

	vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "nf-vol"}, Spec: v1.VolumePairSpec{
		Size: resource.MustParse("64Mi"), Mode: v1.ModeSync, Primary: v1.Member{Node: "nf-a"}, Backup: v1.Member{Node: "nf-b"},
		Clients: &v1.ClientsSpec{Nodes: []string{}}}}
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	nodeSvc := func(name string, m *csifake.Mounter) *csi.Node {
		dev := filepath.Join(dir, name, "dev")
		if err := os.MkdirAll(dev, 0o700); err != nil {
			t.Fatal(err)
		}
		return &csi.Node{NodeID: name, Client: k8s, Namespace: ns, Attacher: &csifake.Attacher{Dir: dev}, Mounter: m,
			StateDir: filepath.Join(dir, name, "state"), Publisher: &csi.Controller{Client: k8s, Namespace: ns, PublishWait: 5 * time.Second}}
	}
	a, b := nodeSvc("nf-a", &csifake.Mounter{}), nodeSvc("nf-b", &csifake.Mounter{})
	capability := &csispec.VolumeCapability{AccessType: &csispec.VolumeCapability_Block{Block: &csispec.VolumeCapability_BlockVolume{}},
		AccessMode: &csispec.VolumeCapability_AccessMode{Mode: csispec.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	stage := func(n *csi.Node) error {
		_, err := n.NodeStageVolume(ctx, &csispec.NodeStageVolumeRequest{VolumeId: "nf-vol", StagingTargetPath: filepath.Join(dir, n.NodeID, "staging"), VolumeCapability: capability})
		return err
	}
	unstage := func(n *csi.Node) error {
		_, err := n.NodeUnstageVolume(ctx, &csispec.NodeUnstageVolumeRequest{VolumeId: "nf-vol", StagingTargetPath: filepath.Join(dir, n.NodeID, "staging")})
		return err
	}
	clients := func() ([]string, []string) {
		cur := &v1.VolumePair{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
			t.Fatal(err)
		}
		var enforced []string
		if cur.Status.Clients != nil {
			enforced = cur.Status.Clients.Nodes
		}
		return cur.Spec.Clients.Nodes, enforced
	}

	// Both at once: exactly one wins.
	errs := make(chan error, 2)
	go func() { errs <- stage(a) }()
	go func() { errs <- stage(b) }()
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) {
		t.Fatalf("two nodes staging one volume at once: %v and %v; want exactly one refused", e1, e2)
	}
	refused := e1
	if refused == nil {
		refused = e2
	}
	if status.Code(refused) != codes.FailedPrecondition {
		t.Fatalf("the loser was refused with %v, want FailedPrecondition", refused)
	}
	spec, enforced := clients()
	if len(spec) != 1 || !slices.Equal(spec, enforced) {
		t.Fatalf("after the stage the client nodes are %v (enforced %v): want the winner, enforced", spec, enforced)
	}
	winner, loser := a, b
	if spec[0] == "nf-b" {
		winner, loser = b, a
	}
	if err := stage(winner); err != nil {
		t.Fatalf("staging again on the winner (idempotent): %v", err)
	}
	if err := stage(loser); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("staging on %s while %s has it: %v, want FailedPrecondition", loser.NodeID, winner.NodeID, err)
	}

	// The winner unstages: the other may stage now.
	if err := unstage(winner); err != nil {
		t.Fatal(err)
	}
	if spec, enforced := clients(); len(spec) != 0 || len(enforced) != 0 {
		t.Fatalf("after the unstage the client nodes are %v (enforced %v), want none", spec, enforced)
	}
	if err := stage(loser); err != nil {
		t.Fatalf("staging on %s after %s unstaged: %v", loser.NodeID, winner.NodeID, err)
	}
	if err := unstage(loser); err != nil {
		t.Fatal(err)
	}

	// A filesystem stage that fails for good (the volume holds another
	// filesystem) leaves neither the attachment nor the fence.
	mounter := &csifake.Mounter{}
	bad := nodeSvc("nf-c", mounter)
	bad.NodeID = "nf-a"
	fsCap := &csispec.VolumeCapability{AccessType: &csispec.VolumeCapability_Mount{Mount: &csispec.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: capability.AccessMode}
	dev, err := bad.Attacher.Attach(ctx, csi.Volume{ID: "nf-vol", Size: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := mounter.Format(ctx, dev, "ext4"); err != nil {
		t.Fatal(err)
	}
	_, err = bad.NodeStageVolume(ctx, &csispec.NodeStageVolumeRequest{VolumeId: "nf-vol", StagingTargetPath: filepath.Join(dir, "nf-c", "staging"), VolumeCapability: fsCap})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("staging an ext4 volume as xfs: %v, want FailedPrecondition", err)
	}
	if spec, _ := clients(); len(spec) != 0 {
		t.Fatalf("a stage that failed for good left the client nodes %v", spec)
	}
	if n := len(bad.Attacher.(*csifake.Attacher).Attached()); n != 0 {
		t.Fatalf("a stage that failed for good left %d volumes attached", n)
	}
}
