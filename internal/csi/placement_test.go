package csi

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func topo(nodes ...string) []*csi.Topology {
	var ts []*csi.Topology
	for _, n := range nodes {
		ts = append(ts, &csi.Topology{Segments: map[string]string{TopologyKey: n}})
	}
	return ts
}

func TestPlace(t *testing.T) {
	const gi = int64(1) << 30
	three := []candidate{{node: "a", free: 10 * gi}, {node: "b", free: 20 * gi}, {node: "c", free: 30 * gi}}
	for _, tc := range []struct {
		name            string
		cands           []candidate
		size            int64
		req             *csi.TopologyRequirement
		primary, backup string
		wantErr         string
	}{
		{name: "most free space", cands: three, size: gi, primary: "c", backup: "b"},
		{name: "preferred node is the primary", cands: three, size: gi, req: &csi.TopologyRequirement{Preferred: topo("a")}, primary: "a", backup: "c"},
		{name: "requisite of two", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a", "b")}, primary: "b", backup: "a"},
		{name: "requisite of one: backup from anywhere", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a"), Preferred: topo("a")}, primary: "a", backup: "c"},
		{name: "preferred outside requisite ignored", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a", "b"), Preferred: topo("c", "a")}, primary: "a", backup: "b"},
		{name: "too small nodes left out", cands: three, size: 15 * gi, primary: "c", backup: "b"},
		{name: "unknown free space last", cands: []candidate{{node: "x", free: -1}, {node: "a", free: gi}, {node: "b", free: 2 * gi}}, size: gi, primary: "b", backup: "a"},
		{name: "unfit nodes left out", cands: []candidate{{node: "a", free: gi, unfit: "cordoned"}, {node: "b", free: gi}, {node: "c", free: gi}}, size: gi, primary: "b", backup: "c"},
		{name: "only one fits", cands: three, size: 25 * gi, wantErr: "only c fits (a: 10Gi free, the volume needs 25Gi; b: 20Gi free, the volume needs 25Gi)"},
		{name: "no agents", cands: nil, size: gi, wantErr: "none fits (no node has a running Tandem agent)"},
		{name: "requisite of two, one fits", cands: []candidate{{node: "a", free: gi}, {node: "b", free: gi, unfit: "Node not Ready"}, {node: "c", free: gi}}, size: gi,
			req: &csi.TopologyRequirement{Requisite: topo("a", "b")}, wantErr: "of the requested topology's nodes (a, b) only a fits (b: Node not Ready)"},
		{name: "requisite names unknown nodes", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("z")}, wantErr: "none of the requested topology's nodes (z) fits"},
		{name: "requisite with foreign keys allows nothing", cands: three, size: gi,
			req: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"topology.kubernetes.io/zone": "z1"}}}}, wantErr: "none of the requested topology's nodes () fits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, b, err := place(tc.cands, tc.size, tc.req)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %s/%s, %v; want an error containing %q", p, b, err, tc.wantErr)
				}
				return
			}
			if err != nil || p != tc.primary || b != tc.backup {
				t.Fatalf("got %s/%s, %v; want %s/%s", p, b, err, tc.primary, tc.backup)
			}
		})
	}
}

func TestVolumeSize(t *testing.T) {
	const r = 64 << 10
	for _, tc := range []struct {
		req, lim, want int64
		err            bool
	}{
		{0, 0, DefaultVolumeSize, false},
		{1, 0, r, false},
		{r, 0, r, false},
		{r + 1, 0, 2 * r, false},
		{0, r, r, false},
		{r + 1, 2*r - 1, 0, true},
		{r + 1, 3 * r, 2 * r, false},
		{2 * r, r, 0, true},
		{-1, 0, 0, true},
		// The data path's limit: v1.MaxRegions regions (the API refuses more).
		{v1.MaxRegions * r, 0, v1.MaxRegions * r, false},
		{v1.MaxRegions*r - 1, 0, v1.MaxRegions * r, false},
		{v1.MaxRegions*r + 1, 0, 0, true},
		{v1.MaxRegions * r, math.MaxInt64, v1.MaxRegions * r, false},
		// Rounding up must not overflow into a negative size.
		{math.MaxInt64, 0, 0, true},
		{math.MaxInt64 - r + 2, math.MaxInt64, 0, true},
	} {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}, r)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("required %d limit %d: got %d, %v; want %d (error %t)", tc.req, tc.lim, got, err, tc.want, tc.err)
		}
	}
	_, err := volumeSize(&csi.CapacityRange{RequiredBytes: math.MaxInt64}, r)
	if status.Code(err) != codes.OutOfRange || !strings.Contains(err.Error(), "at most 281474976645120 bytes (4294967295 regions of 64Ki)") {
		t.Errorf("required MaxInt64: err = %v, want OutOfRange naming the limit", err)
	}
}

// TestGetCapacityMaximumVolumeSize: GetCapacity states the data path's
// largest volume for the class's regionSize (v1.MaxRegions regions), so the
// external-provisioner's CSIStorageCapacity tells the scheduler, rather
// than leaving the limit to a failed CreateVolume.
func TestGetCapacityMaximumVolumeSize(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c := &Controller{Client: fake.NewClientBuilder().WithScheme(scheme).Build(), Namespace: "tandem-system"}
	for _, tc := range []struct {
		params map[string]string
		want   int64
	}{
		{nil, v1.MaxRegions * v1.DefaultRegionSize},
		{map[string]string{ParamRegionSize: "4Ki"}, v1.MaxRegions * 4096},
		{map[string]string{ParamRegionSize: "64Mi"}, v1.MaxRegions * (64 << 20)},
	} {
		resp, err := c.GetCapacity(context.Background(), &csi.GetCapacityRequest{Parameters: tc.params})
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.GetMaximumVolumeSize().GetValue(); got != tc.want {
			t.Errorf("parameters %v: MaximumVolumeSize = %d, want %d", tc.params, got, tc.want)
		}
	}
}
