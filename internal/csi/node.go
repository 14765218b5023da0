package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/fsutil"
)

// Volume is what an Attacher needs to know of a volume.
type Volume struct {
	// ID is the CSI volume ID.
	ID string
	// Pair is the VolumePair's key.
	Pair client.ObjectKey
	// Size is the volume's size in bytes.
	Size int64
}

// Attacher makes a volume a block device on this node that follows the
// pair's writer. Both calls are idempotent.
type Attacher interface {
	// Attach returns the path of the block device holding the volume.
	Attach(ctx context.Context, vol Volume) (device string, err error)
	// Detach removes the device; in-flight writes are flushed first.
	Detach(ctx context.Context, volumeID string) error
}

// Mounter mounts and formats. The Linux one is in mount_linux.go; tests
// use fakes.
type Mounter interface {
	// Mount mounts source at target: a filesystem of type fstype, or a bind
	// mount when bind is true; readOnly mounts it read-only.
	Mount(source, target, fstype string, bind, readOnly bool, options []string) error
	// Unmount unmounts target.
	Unmount(target string) error
	// IsMountPoint says whether something is mounted at path.
	IsMountPoint(path string) (bool, error)
	// Filesystem says what device holds: "ext4", "xfs", "" when it is blank
	// (all zeroes where filesystems keep their signatures), or an error
	// naming what else it holds.
	Filesystem(device string) (string, error)
	// Format makes a filesystem of type fstype on device.
	Format(ctx context.Context, device, fstype string) error
	// Resize grows the filesystem of type fstype on device, mounted at
	// path, to the device's size (online; nothing to do is not an error).
	Resize(ctx context.Context, device, path, fstype string) error
}

// Expander is an Attacher that grows an attached volume's device online
// (NodeExpandVolume).
type Expander interface {
	// Expand makes the device of the attached volume vol.ID show the size
	// its writer's export serves now, once that is at least vol.Size,
	// and returns the device's size. It fails (codes.Unavailable) while
	// the export is smaller, and (codes.NotFound) when the volume is not
	// attached. Nothing to do is not an error.
	Expand(ctx context.Context, vol Volume) (int64, error)
}

// Publisher makes a node a volume's client node and releases it: the
// fence of a volume to one node (Controller's ControllerPublishVolume and
// ControllerUnpublishVolume, which return once the pair's writer enforces
// the change).
type Publisher interface {
	ControllerPublishVolume(context.Context, *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error)
	ControllerUnpublishVolume(context.Context, *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error)
}

// Node serves the CSI node service of one node.
type Node struct {
	csi.UnimplementedNodeServer
	// NodeID is this node's name.
	NodeID string
	// Client reads VolumePairs.
	Client client.Reader
	// Namespace is the driver's namespace (volume IDs without one).
	Namespace string
	Attacher  Attacher
	Mounter   Mounter
	// StateDir holds a record per staged volume, so that unstaging after a
	// restart knows what was done.
	StateDir string
	// Publisher, when set, fences volumes to this node from the node side
	// (the CSIDriver's attachRequired is false): NodeStageVolume makes the
	// node the volume's client node before attaching, and is refused
	// (FailedPrecondition) while another node is; NodeUnstageVolume
	// releases it after detaching. Nil: ControllerPublishVolume (a
	// VolumeAttachment) does that.
	Publisher Publisher
	// ServedSize returns the size every member of a pair serves now (0
	// while unknown): NodeExpandVolume waits for it. Nil reads the
	// VolumePair's status.size (ServedSizeOf).
	ServedSize func(ctx context.Context, key client.ObjectKey) (int64, error)
	// ExpandWait bounds NodeExpandVolume's wait for the members to serve
	// the new size (default DefaultExpandWait); the kubelet retries after.
	ExpandWait time.Duration

	locks sync.Map // volume ID → *sync.Mutex
}

// stageRecord is what NodeStageVolume did, kept in StateDir (JSON).
type stageRecord struct {
	VolumeID    string `json:"volumeID"`
	StagingPath string `json:"stagingPath"`
	Device      string `json:"device"`
	Block       bool   `json:"block"`
	FSType      string `json:"fsType,omitempty"`
	Size        int64  `json:"size"`
	// Published are the target paths the volume is published at, with
	// whether that access mode allows only one.
	Published []publication `json:"published,omitempty"`
}

type publication struct {
	Target       string `json:"target"`
	SingleWriter bool   `json:"singleWriter,omitempty"`
}

// FilesystemTools are the programs the node plugin runs for each filesystem
// it supports: Format makes one, Grow grows it while mounted. The image
// carries them (hack/image/fstools.sh; its test checks it against this
// list).
var FilesystemTools = map[string]struct{ Format, Grow string }{
	"ext4": {Format: "mkfs.ext4", Grow: "resize2fs"},
	"xfs":  {Format: "mkfs.xfs", Grow: "xfs_growfs"},
}

func (n *Node) lock(id string) func() {
	m, _ := n.locks.LoadOrStore(id, &sync.Mutex{})
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

func (n *Node) recordPath(id string) string {
	sum := sha256.Sum256([]byte(id))
	return filepath.Join(n.StateDir, "staged-"+hex.EncodeToString(sum[:8])+".json")
}

func (n *Node) readRecord(id string) (*stageRecord, error) {
	b, err := os.ReadFile(n.recordPath(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading the stage record of %s: %v", id, err)
	}
	r := &stageRecord{}
	if err := json.Unmarshal(b, r); err != nil || r.VolumeID != id {
		return nil, status.Errorf(codes.Internal, "stage record %s of %s is damaged (%v); unmount %s's staging path by hand and remove it", n.recordPath(id), id, err, id)
	}
	return r, nil
}

func (n *Node) writeRecord(r *stageRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return status.Errorf(codes.Internal, "encoding the stage record: %v", err)
	}
	if err := os.MkdirAll(n.StateDir, 0o700); err != nil {
		return status.Errorf(codes.Internal, "state directory: %v", err)
	}
	if err := fsutil.WriteFileAtomic(n.recordPath(r.VolumeID), b, 0o600); err != nil {
		return status.Errorf(codes.Internal, "writing the stage record of %s: %v", r.VolumeID, err)
	}
	return nil
}

// pair reads a volume's VolumePair.
func (n *Node) pair(ctx context.Context, id string) (client.ObjectKey, *v1.VolumePair, error) {
	key, err := VolumeKey(id, n.Namespace)
	if err != nil {
		return key, nil, err
	}
	vp := &v1.VolumePair{}
	if err := n.Client.Get(ctx, key, vp); err != nil {
		if apierrors.IsNotFound(err) {
			return key, nil, status.Errorf(codes.NotFound, "VolumePair %s not found", key)
		}
		return key, nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
	}
	return key, vp, nil
}

// Volume describes volume id for an Attacher.
func (n *Node) Volume(ctx context.Context, id string) (Volume, error) {
	key, vp, err := n.pair(ctx, id)
	if err != nil {
		return Volume{}, err
	}
	return Volume{ID: id, Pair: key, Size: vp.Spec.Size.Value()}, nil
}

// NodeGetInfo names the node and its topology.
func (n *Node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             n.NodeID,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: n.NodeID}},
	}, nil
}

// NodeGetCapabilities: staging, volume stats, expansion.
func (n *Node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func fsTypeOf(vc *csi.VolumeCapability) string {
	if fs := vc.GetMount().GetFsType(); fs != "" {
		return fs
	}
	return "ext4"
}

// NodeStageVolume attaches the volume and, for a filesystem volume, formats
// it if blank and mounts it at the staging path.
func (n *Node) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (_ *csi.NodeStageVolumeResponse, err error) {
	id, staging, vc := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path is empty")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is missing")
	}
	if err := checkCapability(vc); err != nil {
		return nil, err
	}
	defer n.lock(id)()
	key, vp, err := n.pair(ctx, id)
	if err != nil {
		return nil, err
	}
	block := vc.GetBlock() != nil
	fs := ""
	if !block {
		fs = fsTypeOf(vc)
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if rec != nil && (rec.StagingPath != staging || rec.Block != block || rec.FSType != fs) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s is already staged at %s (block %t, filesystem %q)", id, rec.StagingPath, rec.Block, rec.FSType)
	}
	if n.Publisher != nil {
		// The fence first: from here on the writer serves this node's
		// clients and refuses every other node's.
		if _, err := n.Publisher.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: n.NodeID, VolumeCapability: vc}); err != nil {
			return nil, err
		}
		if rec == nil {
			defer func() {
				if err != nil && finalError(err) {
					// The kubelet does not unstage a volume whose stage
					// failed with a final error: undo it here, so that the
					// node does not keep every other node out of a volume
					// it may never use.
					n.undoStage(id)
				}
			}()
		}
	}
	dev, err := n.Attacher.Attach(ctx, Volume{ID: id, Pair: key, Size: vp.Spec.Size.Value()})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, status.Errorf(codes.Unavailable, "attaching volume %s: %v", id, err)
	}
	rec = &stageRecord{VolumeID: id, StagingPath: staging, Device: dev, Block: block, FSType: fs, Size: vp.Spec.Size.Value()}
	// Recorded before mounting: an unstage after a failure below detaches.
	if err := n.writeRecord(rec); err != nil {
		return nil, err
	}
	if block {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "staging path %s: %v", staging, err)
	}
	mounted, err := n.Mounter.IsMountPoint(staging)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "checking staging path %s: %v", staging, err)
	}
	if mounted {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	have, err := n.Mounter.Filesystem(dev)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s: %v; refusing to format it", id, err)
	}
	switch have {
	case "":
		if err := n.Mounter.Format(ctx, dev, fs); err != nil {
			return nil, status.Errorf(codes.Internal, "formatting volume %s as %s: %v", id, fs, err)
		}
	case fs:
	default:
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s holds an %s filesystem, the volume capability asks for %s", id, have, fs)
	}
	if err := n.Mounter.Mount(dev, staging, fs, false, false, vc.GetMount().GetMountFlags()); err != nil {
		return nil, status.Errorf(codes.Internal, "mounting volume %s at %s: %v", id, staging, err)
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// NodeUnstageVolume unmounts the staging path and detaches the volume.
func (n *Node) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path is empty")
	}
	defer n.lock(id)()
	if err := n.unmount(staging); err != nil {
		return nil, err
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if err := n.Attacher.Detach(ctx, id); err != nil {
		return nil, status.Errorf(codes.Internal, "detaching volume %s: %v", id, err)
	}
	if n.Publisher != nil {
		// Detached and flushed: another node may use the volume now.
		if _, err := n.Publisher.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: n.NodeID}); err != nil {
			return nil, err
		}
	}
	if rec != nil {
		if err := os.Remove(n.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, status.Errorf(codes.Internal, "removing the stage record of %s: %v", id, err)
		}
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// finalError says whether the kubelet treats a NodeStageVolume error as
// final (the volume is not staged) rather than uncertain (it calls
// NodeUnstageVolume later): the codes its CSI client counts as final.
func finalError(err error) bool {
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable, codes.ResourceExhausted, codes.Aborted:
		return false
	}
	return true
}

// undoStage detaches a volume whose first stage failed and gives up this
// node's publication (best effort, bounded: the next stage or unstage
// tries again).
func (n *Node) undoStage(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Attacher.Detach(ctx, id); err != nil {
		return // still attached: keep the fence and the record
	}
	_ = os.Remove(n.recordPath(id))
	_, _ = n.Publisher.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: n.NodeID})
}

// unmount unmounts path if something is mounted there (idempotent).
func (n *Node) unmount(path string) error {
	mounted, err := n.Mounter.IsMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "checking %s: %v", path, err)
	}
	if mounted {
		if err := n.Mounter.Unmount(path); err != nil {
			return status.Errorf(codes.Internal, "unmounting %s: %v", path, err)
		}
	}
	return nil
}

// NodePublishVolume bind-mounts the staged filesystem, or the device of a
// block volume, at the target path.
func (n *Node) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, staging, target, vc := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path is empty (the volume must be staged first)")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target path is empty")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is missing")
	}
	if err := checkCapability(vc); err != nil {
		return nil, err
	}
	defer n.lock(id)()
	if _, _, err := n.pair(ctx, id); err != nil {
		return nil, err
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if rec == nil || rec.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", id, staging)
	}
	block := vc.GetBlock() != nil
	if block != rec.Block {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s was staged as %s, published as %s", id, accessName(rec.Block), accessName(block))
	}
	single := vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	for _, p := range rec.Published {
		if p.Target != target && (single || p.SingleWriter) {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is published at %s with a single-writer access mode (ReadWriteOncePod): it cannot be published at %s too", id, p.Target, target)
		}
	}
	readOnly := req.GetReadonly() || vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	src := staging
	if block {
		src = rec.Device
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "target path %s: %v", target, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o600)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "target path %s: %v", target, err)
		}
		_ = f.Close()
	} else if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "target path %s: %v", target, err)
	}
	mounted, err := n.Mounter.IsMountPoint(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "checking target path %s: %v", target, err)
	}
	if !slices.ContainsFunc(rec.Published, func(p publication) bool { return p.Target == target }) {
		rec.Published = append(rec.Published, publication{Target: target, SingleWriter: single})
		if err := n.writeRecord(rec); err != nil {
			return nil, err
		}
	}
	if mounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if err := n.Mounter.Mount(src, target, "", true, readOnly, vc.GetMount().GetMountFlags()); err != nil {
		return nil, status.Errorf(codes.Internal, "bind-mounting volume %s at %s: %v", id, target, err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func accessName(block bool) string {
	if block {
		return "a block device"
	}
	return "a filesystem"
}

// NodeUnpublishVolume unmounts and removes the target path.
func (n *Node) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target path is empty")
	}
	defer n.lock(id)()
	if err := n.unmount(target); err != nil {
		return nil, err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "removing target path %s: %v", target, err)
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if rec != nil {
		kept := slices.DeleteFunc(slices.Clone(rec.Published), func(p publication) bool { return p.Target == target })
		if len(kept) != len(rec.Published) {
			rec.Published = kept
			if err := n.writeRecord(rec); err != nil {
				return nil, err
			}
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports a published volume's usage.
func (n *Node) NodeGetVolumeStats(_ context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	case path == "":
		return nil, status.Error(codes.InvalidArgument, "volume path is empty")
	}
	rec, err := n.readRecord(id)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on node %s", id, n.NodeID)
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.NotFound, "volume path %s does not exist", path)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume path %s: %v", path, err)
	}
	if !fi.IsDir() {
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: rec.Size}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", path, err)
	}
	bs := int64(st.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}
