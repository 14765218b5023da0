package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// DefaultVolumeSize is the size of a volume whose request names none.
const DefaultVolumeSize = 1 << 30

// Controller serves the CSI controller service: volumes are VolumePairs.
type Controller struct {
	csi.UnimplementedControllerServer
	// Client reads and writes VolumePairs, agent Leases and Nodes.
	Client client.Client
	// Namespace holds the VolumePairs the driver creates and the agents'
	// Leases (the operator's namespace).
	Namespace string
	// Clock judges whether an agent's Lease is current (default: real).
	Clock clock.PassiveClock
	// PublishWait bounds the wait for the writer to enforce a publish or
	// unpublish (default DefaultPublishWait).
	PublishWait time.Duration
}

func (c *Controller) now() time.Time {
	if c.Clock == nil {
		return time.Now()
	}
	return c.Clock.Now()
}

// ControllerGetCapabilities: create/delete, publish/unpublish (the pair's
// client restriction: see ControllerPublishVolume), capacity, list, expand.
func (c *Controller) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// VolumePairName is the name CreateVolume gives the VolumePair for a
// request's name.
func VolumePairName(csiName string) string {
	if len(csiName) <= 63 && len(validation.IsDNS1123Label(csiName)) == 0 {
		return csiName
	}
	sum := sha256.Sum256([]byte(csiName))
	return "tv-" + hex.EncodeToString(sum[:])[:40]
}

// volumeKey turns a volume ID into the VolumePair's key.
func (c *Controller) volumeKey(id string) (client.ObjectKey, error) {
	return VolumeKey(id, c.Namespace)
}

// VolumeKey turns a volume ID into the VolumePair's key: "name" in the
// driver's namespace, or "namespace/name".
func VolumeKey(id, namespace string) (client.ObjectKey, error) {
	if id == "" {
		return client.ObjectKey{}, status.Error(codes.InvalidArgument, "volume ID is empty")
	}
	ns, name, found := strings.Cut(id, "/")
	if !found {
		ns, name = namespace, id
	}
	if len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
		return client.ObjectKey{}, status.Errorf(codes.NotFound, "volume ID %q does not name a VolumePair", id)
	}
	return client.ObjectKey{Namespace: ns, Name: name}, nil
}

// checkCapabilities refuses what the node service cannot provide: more
// than one node at a time, or a filesystem other than ext4 and xfs.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are missing")
	}
	for _, vc := range caps {
		if err := checkCapability(vc); err != nil {
			return err
		}
	}
	return nil
}

func checkCapability(vc *csi.VolumeCapability) error {
	switch m := vc.GetAccessMode().GetMode(); m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
	case csi.VolumeCapability_AccessMode_UNKNOWN:
		return status.Error(codes.InvalidArgument, "volume capability has no access mode")
	default:
		return status.Errorf(codes.InvalidArgument, "access mode %s is not supported: a Tandem volume is used from one node at a time (ReadWriteOnce, ReadWriteOncePod)", m)
	}
	switch t := vc.GetAccessType().(type) {
	case *csi.VolumeCapability_Block:
	case *csi.VolumeCapability_Mount:
		if fs := t.Mount.GetFsType(); fs != "" && fs != "ext4" && fs != "xfs" {
			return status.Errorf(codes.InvalidArgument, "filesystem %q is not supported: use ext4 (the default) or xfs", fs)
		}
	default:
		return status.Error(codes.InvalidArgument, "volume capability is neither block nor mount")
	}
	return nil
}

// volumeSize rounds the requested capacity up to whole regions within the
// limit, and refuses more than the data path's v1.MaxRegions regions (the
// API server would refuse the VolumePair; rounding near MaxInt64 would
// overflow).
func volumeSize(r *csi.CapacityRange, region int64) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Error(codes.OutOfRange, "capacity range has a negative bound")
	}
	if lim > 0 && req > lim {
		return 0, status.Errorf(codes.OutOfRange, "required bytes %d exceed the limit %d", req, lim)
	}
	if most := maxVolumeSize(region); req > most {
		return 0, status.Errorf(codes.OutOfRange, "required bytes %d: a volume is at most %d bytes (%d regions of %s): "+
			"the dirty bitmaps number regions with 32 bits; a larger regionSize parameter allows a larger volume", req, most, v1.MaxRegions, qty(region))
	}
	size := req
	if size == 0 {
		size = DefaultVolumeSize
		if lim > 0 && lim < size {
			size = lim
		}
	}
	size = (size + region - 1) / region * region // req <= maxVolumeSize: no overflow
	if lim > 0 && size > lim {
		size = lim / region * region
		if size < req || size == 0 {
			return 0, status.Errorf(codes.OutOfRange, "no whole number of %s regions lies between %d and %d bytes", qty(region), req, lim)
		}
	}
	return size, nil
}

// maxVolumeSize is the largest volume of regions of the given size.
func maxVolumeSize(region int64) int64 { return v1.MaxRegions * region }

// paramsDigest identifies the parameters that shape a volume, so a repeated
// CreateVolume can tell the same request from another.
func paramsDigest(p map[string]string) string {
	keys := make([]string, 0, len(p))
	for k := range p {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	h := sha256.New()
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\n", k, p[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// annParams records paramsDigest on the VolumePair.
const annParams = DriverName + "/parameters"

// CreateVolume creates the VolumePair (or finds the one an earlier call
// created).
func (c *Controller) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is empty")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Error(codes.InvalidArgument, "volume content sources (snapshots, clones) are not supported")
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	size, err := volumeSize(req.GetCapacityRange(), params.regionSize)
	if err != nil {
		return nil, err
	}
	key := client.ObjectKey{Namespace: c.Namespace, Name: VolumePairName(req.GetName())}
	digest := paramsDigest(req.GetParameters())

	vp := &v1.VolumePair{}
	err = c.Client.Get(ctx, key, vp)
	switch {
	case err == nil:
		return c.existing(vp, req, digest)
	case !apierrors.IsNotFound(err):
		return nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
	}

	cands, err := c.candidates(ctx)
	if err != nil {
		return nil, err
	}
	primary, backup, err := place(cands, size, req.GetAccessibilityRequirements())
	if err != nil {
		return nil, status.Error(codes.ResourceExhausted, err.Error())
	}
	vp = &v1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: key.Namespace, Name: key.Name,
			Labels:      map[string]string{LabelManagedBy: DriverName},
			Annotations: map[string]string{AnnVolumeName: req.GetName(), annParams: digest},
		},
		Spec: params.spec,
	}
	vp.Spec.Size = *resource.NewQuantity(size, resource.BinarySI)
	// No client until a node is published (ControllerPublishVolume).
	vp.Spec.Clients = &v1.ClientsSpec{Nodes: []string{}}
	vp.Spec.Primary = v1.Member{Node: primary}
	vp.Spec.Backup = v1.Member{Node: backup}
	if params.pvcName != "" {
		vp.Annotations[AnnPVC] = params.pvcNS + "/" + params.pvcName
	}
	if params.pvName != "" {
		vp.Annotations[AnnPVName] = params.pvName
	}
	if !params.podFailover {
		vp.Annotations[AnnPodFailover] = "false"
	}
	if err := c.Client.Create(ctx, vp); err != nil {
		switch {
		case apierrors.IsAlreadyExists(err):
			// A concurrent call created it: answer as a repeated call.
			if err := c.Client.Get(ctx, key, vp); err != nil {
				return nil, status.Errorf(codes.Aborted, "VolumePair %s was created concurrently and cannot be read: %v", key, err)
			}
			return c.existing(vp, req, digest)
		case apierrors.IsInvalid(err):
			return nil, status.Errorf(codes.InvalidArgument, "the API server refused VolumePair %s: %v", key, err)
		default:
			return nil, status.Errorf(codes.Unavailable, "creating VolumePair %s: %v", key, err)
		}
	}
	return &csi.CreateVolumeResponse{Volume: c.volume(vp)}, nil
}

// existing answers a CreateVolume whose VolumePair exists: the same
// request gets the same volume; anything else is AlreadyExists.
func (c *Controller) existing(vp *v1.VolumePair, req *csi.CreateVolumeRequest, digest string) (*csi.CreateVolumeResponse, error) {
	key := client.ObjectKeyFromObject(vp)
	if vp.Annotations[AnnVolumeName] != req.GetName() {
		return nil, status.Errorf(codes.AlreadyExists, "VolumePair %s exists and was not created for volume %q", key, req.GetName())
	}
	if !vp.DeletionTimestamp.IsZero() {
		return nil, status.Errorf(codes.Aborted, "VolumePair %s is being deleted", key)
	}
	size := vp.Spec.Size.Value()
	r := req.GetCapacityRange()
	if size < r.GetRequiredBytes() || (r.GetLimitBytes() > 0 && size > r.GetLimitBytes()) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, outside the requested range [%d, %d]", req.GetName(), size, r.GetRequiredBytes(), r.GetLimitBytes())
	}
	if vp.Annotations[annParams] != digest {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with other parameters", req.GetName())
	}
	return &csi.CreateVolumeResponse{Volume: c.volume(vp)}, nil
}

// volume describes a VolumePair as a CSI volume.
func (c *Controller) volume(vp *v1.VolumePair) *csi.Volume {
	id := vp.Name
	if vp.Namespace != c.Namespace {
		id = vp.Namespace + "/" + vp.Name
	}
	return &csi.Volume{
		VolumeId:      id,
		CapacityBytes: vp.Spec.Size.Value(),
		AccessibleTopology: []*csi.Topology{
			{Segments: map[string]string{TopologyKey: vp.Spec.Primary.Node}},
			{Segments: map[string]string{TopologyKey: vp.Spec.Backup.Node}},
		},
	}
}

// candidates lists the nodes with an agent Lease, and why any cannot hold
// a member now.
func (c *Controller) candidates(ctx context.Context) ([]candidate, error) {
	var leases coordinationv1.LeaseList
	if err := c.Client.List(ctx, &leases, client.InNamespace(c.Namespace), client.MatchingLabels{v1.LabelComponent: "agent"}); err != nil {
		return nil, status.Errorf(codes.Unavailable, "listing agent Leases: %v", err)
	}
	var nodes corev1.NodeList
	if err := c.Client.List(ctx, &nodes); err != nil {
		return nil, status.Errorf(codes.Unavailable, "listing Nodes: %v", err)
	}
	byName := map[string]*corev1.Node{}
	for i := range nodes.Items {
		byName[nodes.Items[i].Name] = &nodes.Items[i]
	}
	now := c.now()
	var out []candidate
	for _, l := range leases.Items {
		node := l.Labels[v1.LabelNode]
		if node == "" {
			continue
		}
		cd := candidate{node: node, free: -1}
		if s, ok := l.Annotations[v1.AnnFreeBytes]; ok {
			if n, err := strconv.ParseInt(s, 10, 64); err == nil {
				cd.free = n
			}
		}
		cd.unfit = unfit(l, byName[node], now)
		out = append(out, cd)
	}
	return out, nil
}

// unfit says why a node cannot take a new member ("" when it can).
func unfit(l coordinationv1.Lease, n *corev1.Node, now time.Time) string {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return "its agent has not registered"
	}
	if exp := l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second); now.After(exp) {
		return fmt.Sprintf("its agent's Lease expired %s ago", now.Sub(exp).Round(time.Second))
	}
	if n == nil {
		return "no Node object"
	}
	if n.Spec.Unschedulable {
		return "cordoned"
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady && cond.Status != corev1.ConditionTrue {
			return "Node not Ready"
		}
	}
	return ""
}

// DeleteVolume deletes the VolumePair (its replicas go with it unless it
// is annotated storage.tandem.dev/retain-data).
func (c *Controller) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	key, err := c.volumeKey(req.GetVolumeId())
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.DeleteVolumeResponse{}, nil // no such volume: deleted
		}
		return nil, err
	}
	vp := &v1.VolumePair{}
	if err := c.Client.Get(ctx, key, vp); err != nil {
		if apierrors.IsNotFound(err) {
			return &csi.DeleteVolumeResponse{}, nil
		}
		return nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
	}
	if vp.Labels[LabelManagedBy] != DriverName {
		return nil, status.Errorf(codes.FailedPrecondition, "VolumePair %s was not created by %s; delete it yourself if its data is no longer needed", key, DriverName)
	}
	if err := c.Client.Delete(ctx, vp, client.Preconditions{UID: &vp.UID}); err != nil && !apierrors.IsNotFound(err) {
		return nil, status.Errorf(codes.Unavailable, "deleting VolumePair %s: %v", key, err)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities the node service
// supports for an existing volume.
func (c *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	key, err := c.volumeKey(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are missing")
	}
	if err := c.Client.Get(ctx, key, &v1.VolumePair{}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, status.Errorf(codes.NotFound, "VolumePair %s not found", key)
		}
		return nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if _, err := parseParams(req.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// GetCapacity reports the largest volume that could be placed now within
// the topology: the second-largest free space among eligible nodes (a
// volume needs two); and as MaximumVolumeSize the data path's largest
// volume, v1.MaxRegions regions of the class's regionSize.
func (c *Controller) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	most := wrapperspb.Int64(maxVolumeSize(params.regionSize))
	for _, vc := range req.GetVolumeCapabilities() {
		if err := checkCapability(vc); err != nil {
			return &csi.GetCapacityResponse{}, nil //nolint:nilerr // unsupported capability: no capacity
		}
	}
	cands, err := c.candidates(ctx)
	if err != nil {
		return nil, err
	}
	var allowed map[string]bool
	if t := req.GetAccessibleTopology(); t != nil {
		allowed, _ = topologyNodes([]*csi.Topology{t})
	}
	var free []int64
	for _, cd := range cands {
		if cd.unfit != "" || (allowed != nil && !allowed[cd.node]) {
			continue
		}
		f := cd.free
		if f < 0 {
			f = 0
		}
		free = append(free, f)
	}
	slices.Sort(free)
	var capacity int64
	if len(free) >= 2 {
		capacity = free[len(free)-2]
	}
	return &csi.GetCapacityResponse{AvailableCapacity: capacity, MaximumVolumeSize: most}, nil
}

// ListVolumes lists the driver's volumes in name order; the token is the
// last name of the previous page.
func (c *Controller) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Error(codes.InvalidArgument, "max_entries is negative")
	}
	var list v1.VolumePairList
	if err := c.Client.List(ctx, &list, client.InNamespace(c.Namespace), client.MatchingLabels{LabelManagedBy: DriverName}); err != nil {
		return nil, status.Errorf(codes.Unavailable, "listing VolumePairs: %v", err)
	}
	items := list.Items
	slices.SortFunc(items, func(a, b v1.VolumePair) int { return strings.Compare(a.Name, b.Name) })
	start := 0
	if tok := req.GetStartingToken(); tok != "" {
		i, found := slices.BinarySearchFunc(items, tok, func(vp v1.VolumePair, t string) int { return strings.Compare(vp.Name, t) })
		if !found {
			return nil, status.Errorf(codes.Aborted, "starting token %q names no volume (it was deleted since the previous page); list again from the start", tok)
		}
		start = i + 1
	}
	end := len(items)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListVolumesResponse{}
	for i := start; i < end; i++ {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: c.volume(&items[i])})
	}
	if end < len(items) && end > start {
		resp.NextToken = items[end-1].Name
	}
	return resp, nil
}

// DefaultPublishWait bounds how long ControllerPublishVolume and
// ControllerUnpublishVolume wait for the pair's writer to enforce the new
// client restriction (status.clients) before they return an error the
// caller retries.
const DefaultPublishWait = 20 * time.Second

func (c *Controller) publishWait() time.Duration {
	if c.PublishWait > 0 {
		return c.PublishWait
	}
	return DefaultPublishWait
}

// ControllerPublishVolume lets node use the volume: it becomes the pair's
// only client node (spec.clients), and the call returns once the writer
// enforces that. A volume is used from one node at a time: publishing to a
// node while another is published is refused; the other is unpublished
// first (when its Pod is gone, or by the workload failover when its node is
// lost), and from then on the writer refuses that node's clients.
func (c *Controller) ControllerPublishVolume(ctx context.Context, req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	key, err := c.volumeKey(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	node := req.GetNodeId()
	switch {
	case node == "":
		return nil, status.Error(codes.InvalidArgument, "node ID is empty")
	case req.GetVolumeCapability() == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is missing")
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if err := c.Client.Get(ctx, client.ObjectKey{Name: node}, &corev1.Node{}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, status.Errorf(codes.NotFound, "node %s not found", node)
		}
		return nil, status.Errorf(codes.Unavailable, "reading Node %s: %v", node, err)
	}
	vp, err := c.updateClients(ctx, key, func(nodes []string) ([]string, error) {
		for _, n := range nodes {
			if n != node {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %s is published on node %s; a Tandem volume is used from one node at a time", req.GetVolumeId(), n)
			}
		}
		return []string{node}, nil
	})
	if err != nil {
		return nil, err
	}
	if err := c.waitClients(ctx, key, vp, func(enforced []string) bool { return slices.Contains(enforced, node) }); err != nil {
		return nil, err
	}
	return &csi.ControllerPublishVolumeResponse{PublishContext: map[string]string{}}, nil
}

// ControllerUnpublishVolume removes node from the pair's client nodes and
// returns once the writer refuses that node's clients: from then on a Pod
// left on it cannot write, whatever it does.
func (c *Controller) ControllerUnpublishVolume(ctx context.Context, req *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	key, err := c.volumeKey(req.GetVolumeId())
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.ControllerUnpublishVolumeResponse{}, nil
		}
		return nil, err
	}
	node := req.GetNodeId()
	vp, err := c.updateClients(ctx, key, func(nodes []string) ([]string, error) {
		if node == "" {
			return []string{}, nil // from every node
		}
		return slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == node }), nil
	})
	if status.Code(err) == codes.NotFound {
		return &csi.ControllerUnpublishVolumeResponse{}, nil // the volume is gone
	}
	if err != nil {
		return nil, err
	}
	if err := c.waitClients(ctx, key, vp, func(enforced []string) bool {
		return node == "" && len(enforced) == 0 || node != "" && !slices.Contains(enforced, node)
	}); err != nil {
		return nil, err
	}
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}

// updateClients rewrites spec.clients.nodes with f (optimistic
// concurrency: retried on conflicts).
func (c *Controller) updateClients(ctx context.Context, key client.ObjectKey, f func([]string) ([]string, error)) (*v1.VolumePair, error) {
	for attempt := 0; ; attempt++ {
		vp := &v1.VolumePair{}
		if err := c.Client.Get(ctx, key, vp); err != nil {
			if apierrors.IsNotFound(err) {
				return nil, status.Errorf(codes.NotFound, "VolumePair %s not found", key)
			}
			return nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
		}
		var cur []string
		if vp.Spec.Clients != nil {
			cur = vp.Spec.Clients.Nodes
		}
		next, err := f(cur)
		if err != nil {
			return nil, err
		}
		if vp.Spec.Clients != nil && slices.Equal(cur, next) {
			return vp, nil
		}
		vp.Spec.Clients = &v1.ClientsSpec{Nodes: next}
		err = c.Client.Update(ctx, vp)
		switch {
		case err == nil:
			return vp, nil
		case apierrors.IsConflict(err) && attempt < 5:
			continue
		default:
			return nil, status.Errorf(codes.Unavailable, "updating the client nodes of VolumePair %s: %v", key, err)
		}
	}
}

// waitClients waits until the writer enforces what done accepts
// (status.clients), for up to publishWait.
func (c *Controller) waitClients(ctx context.Context, key client.ObjectKey, vp *v1.VolumePair, done func([]string) bool) error {
	ok := func(vp *v1.VolumePair) bool { return vp.Status.Clients != nil && done(vp.Status.Clients.Nodes) }
	if ok(vp) {
		return nil
	}
	var last *v1.VolumePair
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, c.publishWait(), true, func(ctx context.Context) (bool, error) {
		cur := &v1.VolumePair{}
		if err := c.Client.Get(ctx, key, cur); err != nil {
			return false, client.IgnoreNotFound(err)
		}
		last = cur
		return ok(cur), nil
	})
	if err == nil {
		return nil
	}
	enforced := "nothing yet"
	if last != nil && last.Status.Clients != nil {
		enforced = fmt.Sprintf("%v", last.Status.Clients.Nodes)
	}
	return status.Errorf(codes.DeadlineExceeded, "the writer of VolumePair %s does not enforce the new client nodes yet (it enforces %s; is a member reachable?)", key, enforced)
}

// regionSizeOf is a VolumePair's region size in bytes.
func regionSizeOf(vp *v1.VolumePair) int64 {
	if vp.Spec.RegionSize != nil && vp.Spec.RegionSize.Value() > 0 {
		return vp.Spec.RegionSize.Value()
	}
	return v1.DefaultRegionSize
}

// ControllerExpandVolume grows a volume: spec.size of its VolumePair
// becomes the requested capacity rounded up to whole regions (refused above
// v1.MaxRegions regions), and the agents grow its replicas online. A
// volume never shrinks: a request for no more than its size returns its
// size and changes nothing, so repeating a call is harmless. The node
// must always expand (node_expansion_required), block volumes included:
// a device attached over NBD keeps the size it was attached with until
// NodeExpandVolume tells it otherwise, and a filesystem is grown there.
func (c *Controller) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is empty")
	}
	r := req.GetCapacityRange()
	if r == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity range is missing")
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapability(vc); err != nil {
			return nil, err
		}
	}
	key, err := c.volumeKey(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		vp := &v1.VolumePair{}
		if err := c.Client.Get(ctx, key, vp); err != nil {
			if apierrors.IsNotFound(err) {
				return nil, status.Errorf(codes.NotFound, "VolumePair %s not found", key)
			}
			return nil, status.Errorf(codes.Unavailable, "reading VolumePair %s: %v", key, err)
		}
		if !vp.DeletionTimestamp.IsZero() {
			return nil, status.Errorf(codes.FailedPrecondition, "VolumePair %s is being deleted", key)
		}
		cur := vp.Spec.Size.Value()
		if r.GetRequiredBytes() <= cur {
			if lim := r.GetLimitBytes(); lim > 0 && lim < cur {
				return nil, status.Errorf(codes.OutOfRange, "volume %s has %d bytes, more than the limit %d: a volume does not shrink", req.GetVolumeId(), cur, lim)
			}
			return expandResponse(cur), nil
		}
		size, err := volumeSize(r, regionSizeOf(vp))
		if err != nil {
			return nil, err
		}
		q := resource.NewQuantity(size, resource.BinarySI)
		patch := fmt.Sprintf(`{"spec":{"size":%q}}`, q.String())
		err = c.Client.Patch(ctx, vp, client.RawPatch(types.MergePatchType, []byte(patch)))
		switch {
		case err == nil:
			return expandResponse(size), nil
		case apierrors.IsNotFound(err):
			return nil, status.Errorf(codes.NotFound, "VolumePair %s not found", key)
		case apierrors.IsInvalid(err) && attempt < 3:
			// A concurrent call may have grown it further (a volume does
			// not shrink): read it again, and answer from what it has.
			continue
		case apierrors.IsInvalid(err):
			return nil, status.Errorf(codes.InvalidArgument, "the API server refused to grow VolumePair %s to %s: %v", key, q, err)
		default:
			return nil, status.Errorf(codes.Unavailable, "growing VolumePair %s to %s: %v", key, q, err)
		}
	}
}

func expandResponse(size int64) *csi.ControllerExpandVolumeResponse {
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: true}
}
