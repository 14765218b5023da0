package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Disaster-recovery helpers shared by promote, hold and release.

// nameNodeArgs accepts exactly two arguments: the VolumePair's name and a
// member's node.
func nameNodeArgs(cmd *cobra.Command, args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("%s needs exactly two arguments, the VolumePair's name and a member's node (got %d); see '%s --help'", cmd.Name(), len(args), cmd.CommandPath())
	}
	return nil
}

// memberList names the pair's members with the spec field of each, e.g.
// "node-a (spec.primary.node), node-b (spec.backup.node)".
func memberList(vp *storagev1alpha1.VolumePair) string {
	var out []string
	for _, n := range vp.Spec.MemberNodes() {
		out = append(out, fmt.Sprintf("%s (%s)", n, memberField(vp, n)))
	}
	return strings.Join(out, ", ")
}

// notAMember says node is not one of vp's members, and which are.
func notAMember(vp *storagev1alpha1.VolumePair, node string) error {
	return fmt.Errorf("%s is not a member of the pair; its members are %s", node, memberList(vp))
}

// heldMembers parses the storage.tandem.dev/hold-resync annotation as the
// controller does: comma-separated nodes, blanks and repeats dropped.
func heldMembers(vp *storagev1alpha1.VolumePair) []string {
	var out []string
	for _, n := range strings.Split(vp.Annotations[storagev1alpha1.AnnotationHoldResync], ",") {
		if n = strings.TrimSpace(n); n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// patchAnnotations sets (a value) or removes (nil) annotations with one JSON
// merge patch. guarded, it carries vp's resourceVersion, so the API server
// refuses it (Conflict) if the VolumePair changed since it was read: a
// read-modify-write of a list must not drop what someone else added
// meanwhile. vp is updated with the server's answer.
func patchAnnotations(ctx context.Context, c client.Client, vp *storagev1alpha1.VolumePair, set map[string]*string, guarded bool) error {
	md := map[string]any{"annotations": set}
	if guarded {
		md["resourceVersion"] = vp.ResourceVersion
	}
	body, err := json.Marshal(map[string]any{"metadata": md})
	if err != nil {
		return fmt.Errorf("encode patch: %w", err)
	}
	var keys []string
	for k := range set {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if err := c.Patch(ctx, vp, client.RawPatch(types.MergePatchType, body)); err != nil {
		return fmt.Errorf("set annotations %s: %w", strings.Join(keys, ", "), err)
	}
	return nil
}

// completeMembers completes NAME with the namespace's VolumePairs, then
// NODE with the members of that pair that pick keeps.
func (o *rootOptions) completeMembers(pick func(vp *storagev1alpha1.VolumePair, node string) bool) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		switch len(args) {
		case 0:
			return o.completePairNames(cmd, nil, toComplete)
		case 1:
		default:
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		ns, c, err := o.connect()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		vp := &storagev1alpha1.VolumePair{}
		if err := c.Get(cmd.Context(), client.ObjectKey{Namespace: ns, Name: args[0]}, vp); err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var nodes []string
		for _, n := range vp.Spec.MemberNodes() {
			if pick(vp, n) {
				nodes = append(nodes, n)
			}
		}
		return withPrefix(nodes, toComplete), cobra.ShellCompDirectiveNoFileComp
	}
}
