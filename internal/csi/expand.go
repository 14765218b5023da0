package csi

import (
	"context"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// DefaultExpandWait bounds NodeExpandVolume's wait for every member of the
// pair to serve the new size; after it the call fails with Unavailable and
// the kubelet calls again (with its backoff), so a slow grow only delays
// the filesystem's growth.
const DefaultExpandWait = 30 * time.Second

func (n *Node) expandWait() time.Duration {
	if n.ExpandWait > 0 {
		return n.ExpandWait
	}
	return DefaultExpandWait
}

// ServedSizeOf reads the size every member of a pair serves now: the
// VolumePair's status.size (a quantity, set by the controller once each
// member's replica has grown), 0 while it has none. It is read as
// unstructured so that this one function is all that knows the field.
func ServedSizeOf(ctx context.Context, c client.Reader, key client.ObjectKey) (int64, error) {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(v1.GroupVersion.WithKind("VolumePair"))
	if err := c.Get(ctx, key, u); err != nil {
		return 0, fmt.Errorf("reading VolumePair %s: %w", key, err)
	}
	s, found, err := unstructured.NestedString(u.Object, "status", "size")
	if err != nil || !found || s == "" {
		return 0, nil //nolint:nilerr // no size reported (yet)
	}
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return 0, fmt.Errorf("VolumePair %s: status.size %q: %w", key, s, err)
	}
	return q.Value(), nil
}

// NodeExpandVolume grows a staged volume on this node, online: once every
// member serves the requested size (status.size; Unavailable until then,
// after waiting up to ExpandWait), the attached device learns the export's
// new size (Expander: the user-space path reconnects its NBD client and
// tells the loop device; the kernel path hands /dev/nbdN a new socket and
// the new size), then
// the filesystem grows to fill it (resize2fs, xfs_growfs). A block volume
// only has its device grown. Repeating it does nothing more.
func (n *Node) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case path == "":
		return nil, status.Error(codes.InvalidArgument, "volume path is empty")
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapability(vc); err != nil {
			return nil, err
		}
	}
	defer n.lock(id)()
	key, vp, err := n.pair(ctx, id)
	if err != nil {
		return nil, err
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on node %s", id, n.NodeID)
	}
	want := req.GetCapacityRange().GetRequiredBytes()
	if want == 0 {
		want = vp.Spec.Size.Value()
	}
	if have := vp.Spec.Size.Value(); want > have {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s: %d bytes requested, VolumePair %s has %d (ControllerExpandVolume grows it first)", id, want, key, have)
	}
	exp, ok := n.Attacher.(Expander)
	if !ok {
		return nil, status.Errorf(codes.Unimplemented, "this node's attach path cannot grow an attached volume")
	}
	if err := n.waitServed(ctx, key, want); err != nil {
		return nil, err
	}
	size, err := exp.Expand(ctx, Volume{ID: id, Pair: key, Size: want})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, status.Errorf(codes.Internal, "growing the device of volume %s: %v", id, err)
	}
	if size < want {
		return nil, status.Errorf(codes.Unavailable, "the device of volume %s has %d bytes, %d requested", id, size, want)
	}
	if rec.Size != size {
		rec.Size = size
		if err := n.writeRecord(rec); err != nil {
			return nil, err
		}
	}
	if !rec.Block {
		if err := n.Mounter.Resize(ctx, rec.Device, rec.StagingPath, rec.FSType); err != nil {
			return nil, status.Errorf(codes.Internal, "growing the %s filesystem of volume %s: %v", rec.FSType, id, err)
		}
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// waitServed waits until every member of the pair serves at least want
// bytes, for up to ExpandWait.
func (n *Node) waitServed(ctx context.Context, key client.ObjectKey, want int64) error {
	served := n.ServedSize
	if served == nil {
		served = func(ctx context.Context, key client.ObjectKey) (int64, error) {
			return ServedSizeOf(ctx, n.Client, key)
		}
	}
	var last int64
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, n.expandWait(), true, func(ctx context.Context) (bool, error) {
		s, err := served(ctx, key)
		if err != nil {
			lastErr = err
			return false, nil
		}
		last, lastErr = s, nil
		return s >= want, nil
	})
	if err == nil {
		return nil
	}
	if lastErr != nil {
		return status.Errorf(codes.Unavailable, "waiting for the members of VolumePair %s to serve %d bytes: %v", key, want, lastErr)
	}
	return status.Errorf(codes.Unavailable, "the members of VolumePair %s do not all serve %d bytes yet (status.size is %d after %s): its agents grow their replicas first; the kubelet tries again",
		key, want, last, n.expandWait())
}
