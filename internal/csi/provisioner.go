package csi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

// The manager's rules for the CSI controller side (make manifests collects
// them into config/rbac/role.yaml with the controllers'):
// +kubebuilder:rbac:groups=storage.tandem.dev,resources=volumepairs,verbs=get;list;watch;create;delete
// +kubebuilder:rbac:groups=core,resources=persistentvolumes,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=core,resources=persistentvolumeclaims,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=storage.k8s.io,resources=storageclasses,verbs=get;list;watch

// ParamFSType is the StorageClass parameter naming a volume's filesystem
// (the key the external-provisioner sidecar uses).
const ParamFSType = "csi.storage.k8s.io/fstype"

// Provisioner provisions PersistentVolumes for claims of StorageClasses
// whose provisioner is csi.tandem.dev, through the driver's own
// CreateVolume and DeleteVolume: the work the external-provisioner sidecar
// does in front of other CSI drivers, in process (the sidecar's image is not
// something every cluster can pull; the library it is built on is used
// here).
type Provisioner struct {
	Controller *Controller
	// Attachments lists VolumeAttachments (the manager's cache): a PV still
	// attached to a node is not deleted (nil: no check).
	Attachments client.Reader
}

var _ controller.Provisioner = (*Provisioner)(nil)

// accessModes maps a claim's access modes to CSI's; Tandem volumes are
// used from one node at a time.
func accessModes(pvc *corev1.PersistentVolumeClaim) ([]csi.VolumeCapability_AccessMode_Mode, error) {
	var out []csi.VolumeCapability_AccessMode_Mode
	for _, m := range pvc.Spec.AccessModes {
		switch m {
		case corev1.ReadWriteOnce:
			out = append(out, csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)
		case corev1.ReadWriteOncePod:
			out = append(out, csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
		default:
			return nil, fmt.Errorf("access mode %s is not supported: a Tandem volume is used from one node at a time (ReadWriteOnce or ReadWriteOncePod)", m)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("the claim names no access mode")
	}
	return out, nil
}

// allowedNodes returns the names of the nodes a StorageClass's
// allowedTopologies admit (nil when it has none).
func (p *Provisioner) allowedNodes(ctx context.Context, sc *storagev1.StorageClass) ([]string, error) {
	if len(sc.AllowedTopologies) == 0 {
		return nil, nil
	}
	var nodes corev1.NodeList
	if err := p.Controller.Client.List(ctx, &nodes); err != nil {
		return nil, fmt.Errorf("listing Nodes: %w", err)
	}
	var out []string
	for _, term := range sc.AllowedTopologies {
		sel := labels.NewSelector()
		for _, e := range term.MatchLabelExpressions {
			key := e.Key
			if key == TopologyKey {
				key = corev1.LabelHostname // a node's csi.tandem.dev/node is its name
			}
			r, err := labels.NewRequirement(key, selection.In, e.Values)
			if err != nil {
				return nil, fmt.Errorf("StorageClass %s: allowedTopologies: %w", sc.Name, err)
			}
			sel = sel.Add(*r)
		}
		for _, n := range nodes.Items {
			lbl := labels.Set(maps(n.Labels, corev1.LabelHostname, n.Name))
			if sel.Matches(lbl) && !slices.Contains(out, n.Name) {
				out = append(out, n.Name)
			}
		}
	}
	slices.Sort(out)
	if len(out) < 2 {
		return nil, fmt.Errorf("StorageClass %s: allowedTopologies admit %d node(s) (%s); a VolumePair needs two", sc.Name, len(out), strings.Join(out, ", "))
	}
	return out, nil
}

// maps returns m with key set to val when m lacks it (a node's hostname
// label is its name unless the kubelet says otherwise).
func maps(m map[string]string, key, val string) map[string]string {
	out := map[string]string{key: val}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Provision creates the VolumePair of a claim and describes it as a PV.
func (p *Provisioner) Provision(ctx context.Context, opts controller.ProvisionOptions) (*corev1.PersistentVolume, controller.ProvisioningState, error) {
	sc, pvc := opts.StorageClass, opts.PVC
	modes, err := accessModes(pvc)
	if err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	fsType := sc.Parameters[ParamFSType]
	block := pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock
	var caps []*csi.VolumeCapability
	for _, m := range modes {
		vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: m}}
		if block {
			vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		} else {
			vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType, MountFlags: sc.MountOptions}}
		}
		caps = append(caps, vc)
	}
	params := map[string]string{}
	for k, v := range sc.Parameters {
		params[k] = v
	}
	params[paramPVCName], params[paramPVCNamespace], params[paramPVName] = pvc.Name, pvc.Namespace, opts.PVName

	allowed, err := p.allowedNodes(ctx, sc)
	if err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	req := &csi.TopologyRequirement{}
	for _, n := range allowed {
		req.Requisite = append(req.Requisite, &csi.Topology{Segments: map[string]string{TopologyKey: n}})
	}
	if sel := opts.SelectedNodeName; sel != "" {
		// WaitForFirstConsumer: the pod's node must be a member, the
		// primary, or the pod cannot run there.
		cands, err := p.Controller.candidates(ctx)
		if err != nil {
			return nil, controller.ProvisioningFinished, err
		}
		i := slices.IndexFunc(cands, func(c candidate) bool { return c.node == sel })
		switch {
		case i < 0:
			return nil, controller.ProvisioningReschedule, fmt.Errorf("node %s, chosen for the pod, has no Tandem agent", sel)
		case cands[i].unfit != "":
			return nil, controller.ProvisioningReschedule, fmt.Errorf("node %s, chosen for the pod, cannot hold a member: %s", sel, cands[i].unfit)
		}
		req.Preferred = []*csi.Topology{{Segments: map[string]string{TopologyKey: sel}}}
	}
	capRange := &csi.CapacityRange{}
	if q, ok := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; ok {
		capRange.RequiredBytes = q.Value()
	}
	if q, ok := pvc.Spec.Resources.Limits[corev1.ResourceStorage]; ok {
		capRange.LimitBytes = q.Value()
	}
	resp, err := p.Controller.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: opts.PVName, CapacityRange: capRange, VolumeCapabilities: caps, Parameters: params,
		AccessibilityRequirements: req,
	})
	if err != nil {
		state := controller.ProvisioningFinished
		if c := status.Code(err); c == codes.Unavailable || c == codes.Aborted {
			state = controller.ProvisioningInBackground
		}
		return nil, state, errors.New(status.Convert(err).Message())
	}
	vol := resp.GetVolume()
	var members []string
	for _, t := range vol.GetAccessibleTopology() {
		members = append(members, t.GetSegments()[TopologyKey])
	}
	reclaim := corev1.PersistentVolumeReclaimDelete
	if sc.ReclaimPolicy != nil {
		reclaim = *sc.ReclaimPolicy
	}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: opts.PVName},
		Spec: corev1.PersistentVolumeSpec{
			PersistentVolumeReclaimPolicy: reclaim,
			AccessModes:                   pvc.Spec.AccessModes,
			VolumeMode:                    pvc.Spec.VolumeMode,
			MountOptions:                  sc.MountOptions,
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: *resource.NewQuantity(vol.GetCapacityBytes(), resource.BinarySI)},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: DriverName, VolumeHandle: vol.GetVolumeId(), FSType: fsTypeOrDefault(fsType, block),
				VolumeAttributes: map[string]string{"storage.tandem.dev/volume-pair": p.Controller.Namespace + "/" + VolumePairName(opts.PVName)},
			}},
			NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{Key: TopologyKey, Operator: corev1.NodeSelectorOpIn, Values: members}},
			}}}},
		},
	}
	return pv, controller.ProvisioningFinished, nil
}

func fsTypeOrDefault(fs string, block bool) string {
	if block {
		return ""
	}
	if fs == "" {
		return "ext4"
	}
	return fs
}

// Delete deletes the VolumePair of a PV this driver provisioned.
func (p *Provisioner) Delete(ctx context.Context, pv *corev1.PersistentVolume) error {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != DriverName {
		return &controller.IgnoredError{Reason: "not a " + DriverName + " volume"}
	}
	// As the external-provisioner does: a PV deleted while its
	// VolumeAttachment still stands can never be detached (the
	// attach/detach controller needs the PV to detach it), which leaves the
	// attachment, and the node's fence, behind for good. The library
	// retries the deletion with backoff and records the reason on the PV.
	if p.Attachments != nil {
		var vas storagev1.VolumeAttachmentList
		if err := p.Attachments.List(ctx, &vas); err != nil {
			return fmt.Errorf("list VolumeAttachments: %w", err)
		}
		for _, va := range vas.Items {
			if va.Spec.Attacher == DriverName && va.Spec.Source.PersistentVolumeName != nil && *va.Spec.Source.PersistentVolumeName == pv.Name {
				return fmt.Errorf("persistentvolume %s is still attached to node %s (VolumeAttachment %s); it is deleted once detached", pv.Name, va.Spec.NodeName, va.Name)
			}
		}
	}
	if _, err := p.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: pv.Spec.CSI.VolumeHandle}); err != nil {
		return errors.New(status.Convert(err).Message())
	}
	return nil
}
