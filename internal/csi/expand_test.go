package csi

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func expandPair(size, region string) *v1.VolumePair {
	vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: "pvc-1"}}
	vp.Spec.Size = resource.MustParse(size)
	if region != "" {
		q := resource.MustParse(region)
		vp.Spec.RegionSize = &q
	}
	return vp
}

// TestControllerExpandVolume: the capacity is rounded up to whole regions
// and written to spec.size; a request for no more than the volume has
// changes nothing and returns its size; more than v1.MaxRegions regions,
// a limit below the size, a missing range or volume are refused; the node
// always expands.
func TestControllerExpandVolume(t *testing.T) {
	const gi = 1 << 30
	for _, c := range []struct {
		name       string
		size       string // spec.size before
		region     string
		req, lim   int64
		block      bool
		noRange    bool
		id         string
		wantCode   codes.Code
		wantBytes  int64
		wantSpecSz string // spec.size after
	}{
		{name: "grows", size: "1Gi", req: 2 * gi, wantBytes: 2 * gi, wantSpecSz: "2Gi"},
		{name: "rounds up to the default region", size: "1Gi", req: gi + 1, wantBytes: gi + 64<<10, wantSpecSz: "1073807360"},
		{name: "rounds up to the pair's region", size: "4Mi", region: "4Mi", req: 5 << 20, wantBytes: 8 << 20, wantSpecSz: "8Mi"},
		{name: "block volume", size: "1Gi", req: 3 * gi, block: true, wantBytes: 3 * gi, wantSpecSz: "3Gi"},
		{name: "same size: nothing to do", size: "2Gi", req: 2 * gi, wantBytes: 2 * gi, wantSpecSz: "2Gi"},
		{name: "smaller: no shrink", size: "2Gi", req: gi, wantBytes: 2 * gi, wantSpecSz: "2Gi"},
		{name: "limit below the size", size: "2Gi", req: gi, lim: gi, wantCode: codes.OutOfRange, wantSpecSz: "2Gi"},
		{name: "above 2^32-1 regions", size: "1Gi", region: "4Ki", req: v1.MaxRegions*4096 + 1, wantCode: codes.OutOfRange, wantSpecSz: "1Gi"},
		{name: "at 2^32-1 regions", size: "1Gi", region: "4Ki", req: v1.MaxRegions * 4096, wantBytes: v1.MaxRegions * 4096, wantSpecSz: "17592186040320"},
		{name: "no whole region within the limit", size: "1Gi", req: gi + 1, lim: gi + 2, wantCode: codes.OutOfRange, wantSpecSz: "1Gi"},
		{name: "no capacity range", size: "1Gi", noRange: true, wantCode: codes.InvalidArgument, wantSpecSz: "1Gi"},
		{name: "no such volume", size: "1Gi", req: 2 * gi, id: "pvc-2", wantCode: codes.NotFound, wantSpecSz: "1Gi"},
		{name: "no volume ID", size: "1Gi", req: 2 * gi, id: "-", wantCode: codes.InvalidArgument, wantSpecSz: "1Gi"},
	} {
		t.Run(c.name, func(t *testing.T) {
			vp := expandPair(c.size, c.region)
			cl := fake.NewClientBuilder().WithScheme(placementScheme(t)).WithObjects(vp).Build()
			ctl := &Controller{Client: cl, Namespace: "tandem-system"}
			req := &csi.ControllerExpandVolumeRequest{VolumeId: "pvc-1", CapacityRange: &csi.CapacityRange{RequiredBytes: c.req, LimitBytes: c.lim}}
			switch c.id {
			case "":
			case "-":
				req.VolumeId = ""
			default:
				req.VolumeId = c.id
			}
			if c.noRange {
				req.CapacityRange = nil
			}
			req.VolumeCapability = &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}}}
			if c.block {
				req.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
			}
			for round := 0; round < 2; round++ { // idempotent
				resp, err := ctl.ControllerExpandVolume(context.Background(), req)
				if status.Code(err) != c.wantCode {
					t.Fatalf("round %d: error %v, want code %s", round, err, c.wantCode)
				}
				if err == nil {
					if resp.GetCapacityBytes() != c.wantBytes || !resp.GetNodeExpansionRequired() {
						t.Fatalf("round %d: capacity %d, node expansion %t; want %d, true", round, resp.GetCapacityBytes(), resp.GetNodeExpansionRequired(), c.wantBytes)
					}
				}
			}
			got := &v1.VolumePair{}
			if err := cl.Get(context.Background(), client.ObjectKeyFromObject(vp), got); err != nil {
				t.Fatal(err)
			}
			if want := resource.MustParse(c.wantSpecSz); got.Spec.Size.Cmp(want) != 0 {
				t.Errorf("spec.size %s, want %s", got.Spec.Size.String(), c.wantSpecSz)
			}
		})
	}
}

// TestCapabilitiesAdvertiseExpansion: the controller service expands, and
// the plugin expands online.
func TestCapabilitiesAdvertiseExpansion(t *testing.T) {
	cc, _ := (&Controller{}).ControllerGetCapabilities(context.Background(), nil)
	found := false
	for _, c := range cc.GetCapabilities() {
		found = found || c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_EXPAND_VOLUME
	}
	if !found {
		t.Error("the controller service does not advertise EXPAND_VOLUME")
	}
	nc, _ := (&Node{}).NodeGetCapabilities(context.Background(), nil)
	found = false
	for _, c := range nc.GetCapabilities() {
		found = found || c.GetRpc().GetType() == csi.NodeServiceCapability_RPC_EXPAND_VOLUME
	}
	if !found {
		t.Error("the node service does not advertise EXPAND_VOLUME")
	}
	for _, ctl := range []bool{true, false} {
		pc, _ := (&Identity{Controller: ctl}).GetPluginCapabilities(context.Background(), nil)
		found = false
		for _, c := range pc.GetCapabilities() {
			found = found || c.GetVolumeExpansion().GetType() == csi.PluginCapability_VolumeExpansion_ONLINE
		}
		if !found {
			t.Errorf("the plugin (controller %t) does not advertise online volume expansion", ctl)
		}
	}
}
