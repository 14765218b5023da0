package csi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Pod placement: a Pod created while its Tandem volumes already have a
// writer is steered to the writer's node, so its I/O stays on the node that
// holds the acting primary instead of crossing the network to it. The PV's
// node affinity (the two members, required) already keeps the Pod on a
// member; the webhook adds a preferred term for the member that is the
// writer now. Preferred, not required: a writer's node that is full or
// cordoned must not keep the Pod from running on the other member.
const (
	// PodPlacementPath is where the manager serves the mutating webhook.
	PodPlacementPath = "/mutate-v1-pod-placement"
	// AnnPreferWriter on a Pod: "false" leaves its scheduling alone.
	AnnPreferWriter = DriverName + "/prefer-writer"
	// AnnPreferredNode is set on a Pod the webhook steered: the writer
	// nodes it prefers, comma-separated, and why.
	AnnPreferredNode = DriverName + "/preferred-node"
	// placementWeight of each preferred term: the most a term can weigh,
	// so the writer outweighs the scheduler's default scoring.
	placementWeight = 100
)

// PodPlacement is the Pod mutating admission webhook described above. It
// never refuses a Pod: a lookup that fails admits the Pod unchanged, with
// a warning (and the webhook is installed with failurePolicy: Ignore, so an
// unreachable manager does not either).
type PodPlacement struct {
	// Reader looks up claims, volumes and VolumePairs (uncached: a Pod
	// created right after its claim was bound must see the binding).
	Reader client.Reader
	// Namespace is the driver's namespace (volume IDs without one).
	Namespace string
	Decoder   admission.Decoder
}

// Handle adds the preferred node affinity to a Pod being created.
func (p *PodPlacement) Handle(ctx context.Context, req admission.Request) admission.Response {
	pod := &corev1.Pod{}
	if err := p.Decoder.Decode(req, pod); err != nil {
		return admission.Errored(http.StatusBadRequest, fmt.Errorf("decode the Pod: %w", err))
	}
	if pod.Annotations[AnnPreferWriter] == "false" {
		return admission.Allowed("the Pod opted out (" + AnnPreferWriter + ": false)")
	}
	ns := pod.Namespace
	if ns == "" {
		ns = req.Namespace
	}
	writers, why, err := p.writers(ctx, ns, pod)
	if err != nil {
		logf.FromContext(ctx).Info("Pod placement: no preference", "namespace", ns, "pod", pod.Name+pod.GenerateName, "error", err.Error())
		return admission.Allowed("").WithWarnings(fmt.Sprintf("%s: the writer of the Pod's volume could not be looked up, no node preferred: %v", DriverName, err))
	}
	if !Prefer(pod, writers) {
		return admission.Allowed("")
	}
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[AnnPreferredNode] = strings.Join(writers, ",") + " (writer of " + strings.Join(why, ", ") + ")"
	b, err := json.Marshal(pod)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	return admission.PatchResponseFromRaw(req.Object.Raw, b)
}

// writers returns the nodes that serve the Pod's Tandem volumes now (each
// once, in the order of the Pod's volumes) and the claims they serve.
// Claims not bound yet (WaitForFirstConsumer: the provisioner makes the
// scheduler's node the writer anyway), other drivers' volumes and pairs
// without a writer are skipped.
func (p *PodPlacement) writers(ctx context.Context, ns string, pod *corev1.Pod) (nodes, why []string, err error) {
	for _, vol := range pod.Spec.Volumes {
		if vol.PersistentVolumeClaim == nil {
			continue
		}
		claim := vol.PersistentVolumeClaim.ClaimName
		var pvc corev1.PersistentVolumeClaim
		if err := p.Reader.Get(ctx, client.ObjectKey{Namespace: ns, Name: claim}, &pvc); err != nil {
			if apierrors.IsNotFound(err) {
				continue
			}
			return nil, nil, fmt.Errorf("claim %s/%s: %w", ns, claim, err)
		}
		if pvc.Spec.VolumeName == "" {
			continue
		}
		var pv corev1.PersistentVolume
		if err := p.Reader.Get(ctx, client.ObjectKey{Name: pvc.Spec.VolumeName}, &pv); err != nil {
			if apierrors.IsNotFound(err) {
				continue
			}
			return nil, nil, fmt.Errorf("volume %s of claim %s/%s: %w", pvc.Spec.VolumeName, ns, claim, err)
		}
		if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != DriverName {
			continue
		}
		key, err := VolumeKey(pv.Spec.CSI.VolumeHandle, p.Namespace)
		if err != nil {
			continue
		}
		var vp v1.VolumePair
		if err := p.Reader.Get(ctx, key, &vp); err != nil {
			if apierrors.IsNotFound(err) {
				continue
			}
			return nil, nil, fmt.Errorf("VolumePair %s of claim %s/%s: %w", key, ns, claim, err)
		}
		w := vp.Status.ActivePrimary
		if w == "" {
			continue
		}
		why = append(why, "claim "+claim)
		if !slices.Contains(nodes, w) {
			nodes = append(nodes, w)
		}
	}
	return nodes, why, nil
}

// Prefer adds a preferred node affinity term for each of nodes (by the
// driver's topology label, the one the PV's affinity uses) that the Pod
// does not carry yet; it reports whether it changed the Pod.
func Prefer(pod *corev1.Pod, nodes []string) bool {
	changed := false
	for _, n := range nodes {
		term := corev1.PreferredSchedulingTerm{
			Weight: placementWeight,
			Preference: corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: TopologyKey, Operator: corev1.NodeSelectorOpIn, Values: []string{n}},
			}},
		}
		if pod.Spec.Affinity == nil {
			pod.Spec.Affinity = &corev1.Affinity{}
		}
		if pod.Spec.Affinity.NodeAffinity == nil {
			pod.Spec.Affinity.NodeAffinity = &corev1.NodeAffinity{}
		}
		na := pod.Spec.Affinity.NodeAffinity
		if slices.ContainsFunc(na.PreferredDuringSchedulingIgnoredDuringExecution, func(t corev1.PreferredSchedulingTerm) bool {
			return t.Weight == term.Weight && len(t.Preference.MatchFields) == 0 && slices.EqualFunc(t.Preference.MatchExpressions, term.Preference.MatchExpressions,
				func(a, b corev1.NodeSelectorRequirement) bool {
					return a.Key == b.Key && a.Operator == b.Operator && slices.Equal(a.Values, b.Values)
				})
		}) {
			continue
		}
		na.PreferredDuringSchedulingIgnoredDuringExecution = append(na.PreferredDuringSchedulingIgnoredDuringExecution, term)
		changed = true
	}
	return changed
}
