package csi_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	csispec "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/csi/csifake"
)

// TestNodeExpandVolume: a staged volume whose VolumePair grew has its
// device grown and then its filesystem (a block volume: the device only),
// but only once every member serves the new size (Unavailable before, for
// the kubelet to retry); repeating it changes nothing; a volume not staged
// here, a size the VolumePair does not have yet, and missing arguments
// are refused.
func TestNodeExpandVolume(t *testing.T) {
	for _, block := range []bool{false, true} {
		name := "filesystem"
		if block {
			name = "block"
		}
		t.Run(name, func(t *testing.T) {
			s := runtime.NewScheme()
			if err := clientgoscheme.AddToScheme(s); err != nil {
				t.Fatal(err)
			}
			if err := v1.AddToScheme(s); err != nil {
				t.Fatal(err)
			}
			vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: "pvc-1"}}
			vp.Spec.Size = resource.MustParse("16Mi")
			cl := fake.NewClientBuilder().WithScheme(s).WithObjects(vp).Build()
			dir := t.TempDir()
			att := &csifake.Attacher{Dir: dir}
			m := &csifake.Mounter{}
			var served atomic.Int64
			served.Store(16 << 20)
			n := &csi.Node{NodeID: "node-a", Client: cl, Namespace: "tandem-system", Attacher: att, Mounter: m,
				StateDir: filepath.Join(dir, "state"), ExpandWait: 300 * time.Millisecond,
				ServedSize: func(context.Context, client.ObjectKey) (int64, error) { return served.Load(), nil }}
			vc := &csispec.VolumeCapability{AccessMode: &csispec.VolumeCapability_AccessMode{Mode: csispec.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
				AccessType: &csispec.VolumeCapability_Mount{Mount: &csispec.VolumeCapability_MountVolume{FsType: "ext4"}}}
			if block {
				vc.AccessType = &csispec.VolumeCapability_Block{Block: &csispec.VolumeCapability_BlockVolume{}}
			}
			ctx := context.Background()
			staging := filepath.Join(dir, "staging")
			expand := func(bytes int64) (*csispec.NodeExpandVolumeResponse, error) {
				return n.NodeExpandVolume(ctx, &csispec.NodeExpandVolumeRequest{VolumeId: "pvc-1", VolumePath: filepath.Join(dir, "target"),
					StagingTargetPath: staging, VolumeCapability: vc, CapacityRange: &csispec.CapacityRange{RequiredBytes: bytes}})
			}
			if _, err := expand(32 << 20); status.Code(err) != codes.NotFound {
				t.Fatalf("expanding a volume not staged: %v, want NotFound", err)
			}
			if _, err := n.NodeStageVolume(ctx, &csispec.NodeStageVolumeRequest{VolumeId: "pvc-1", StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
				t.Fatal(err)
			}
			if _, err := expand(32 << 20); status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("expanding beyond the VolumePair's size: %v, want FailedPrecondition", err)
			}
			vp.Spec.Size = resource.MustParse("32Mi")
			if err := cl.Update(ctx, vp); err != nil {
				t.Fatal(err)
			}
			if _, err := expand(32 << 20); status.Code(err) != codes.Unavailable {
				t.Fatalf("expanding before the members serve the size: %v, want Unavailable", err)
			}
			if fi, _ := os.Stat(att.Path("pvc-1")); fi == nil || fi.Size() != 16<<20 {
				t.Fatalf("the device grew before the members served the size: %v", fi)
			}
			served.Store(32 << 20)
			for round := 0; round < 2; round++ {
				resp, err := expand(32 << 20)
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if resp.GetCapacityBytes() != 32<<20 {
					t.Fatalf("round %d: capacity %d", round, resp.GetCapacityBytes())
				}
			}
			if fi, err := os.Stat(att.Path("pvc-1")); err != nil || fi.Size() != 32<<20 {
				t.Fatalf("device %v, %v; want 32 MiB", fi, err)
			}
			wantResized := 2 // resize2fs has nothing to do the second time
			if block {
				wantResized = 0
			}
			if got := len(m.Resized()); got != wantResized {
				t.Errorf("%d filesystem resizes, want %d", got, wantResized)
			}
			for _, req := range []*csispec.NodeExpandVolumeRequest{{VolumePath: "/x"}, {VolumeId: "pvc-1"}} {
				if _, err := n.NodeExpandVolume(ctx, req); status.Code(err) != codes.InvalidArgument {
					t.Errorf("NodeExpandVolume(%v): %v, want InvalidArgument", req, err)
				}
			}
			if _, err := n.NodeExpandVolume(ctx, &csispec.NodeExpandVolumeRequest{VolumeId: "pvc-2", VolumePath: "/x"}); status.Code(err) != codes.NotFound {
				t.Errorf("NodeExpandVolume of a volume that does not exist: %v, want NotFound", err)
			}
		})
	}
}
