package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// agentDataDir is the agents' default --data-dir; a replica's files are in
// volumes/NAMESPACE/NAME under it.
const agentDataDir = "/var/lib/tandem"

// newHoldCmd is kubectl tandem hold (hold true) or release (false).
func newHoldCmd(o *rootOptions, hold bool) *cobra.Command {
	var out *outputFlags
	cmd := &cobra.Command{
		Use:   "hold NAME NODE",
		Short: "Keep a returning member out of resync, fenced, with its data as it came back",
		Long: `Keep NODE out of resync: adds NODE to the annotation
storage.tandem.dev/hold-resync (a comma-separated list of nodes; the others
are kept).

A held member that returns, or that is connected now, is fenced (role None)
instead of being made a backup: it receives none of the writer's writes, so
its replica stays as it came back, for an operator to look at before the
resync overwrites what it wrote since it left (after a force-promote, say).
The pair is Degraded (reason ResyncHeld) while it is held, and the member is
never promoted automatically (FailoverBlocked reason BackupHeld; kubectl
tandem promote --force can still promote it).

kubectl tandem release NAME NODE ends the hold: NODE is resynced.

Refused, with nothing set: NODE is not a member, or NODE is the writer (it is
never resynced; hold a lost writer once another member took over).`,
		Example: "  kubectl tandem hold db node-a -n prod",
		Args:    nameNodeArgs,
		ValidArgsFunction: o.completeMembers(func(vp *storagev1alpha1.VolumePair, node string) bool {
			return node != vp.Status.ActivePrimary && !slices.Contains(heldMembers(vp), node)
		}),
	}
	if !hold {
		cmd.Use = "release NAME NODE"
		cmd.Short = "End a member's hold: it is resynced from the writer"
		cmd.Long = `End NODE's hold: removes NODE from the annotation
storage.tandem.dev/hold-resync (the annotation goes when no node is left).

The controller then makes NODE a backup of the writer and resyncs it: the
regions where it differs are copied from the writer, which overwrites what
NODE wrote since it left. Those writes are lost.

Refused: NODE is not held.`
		cmd.Example = "  kubectl tandem release db node-a -n prod"
		cmd.ValidArgsFunction = o.completeMembers(func(vp *storagev1alpha1.VolumePair, node string) bool {
			return slices.Contains(heldMembers(vp), node)
		})
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		p, err := out.objectPrinter()
		if err != nil {
			return err
		}
		ns, c, err := o.connect()
		if err != nil {
			return err
		}
		vp, changed, err := setHold(cmd.Context(), c, ns, args[0], args[1], hold)
		if err != nil {
			return err
		}
		if p != nil {
			return out.printObject(p, o.streams.Out, vp, volumePairGVK)
		}
		return renderHold(o.streams.Out, vp, args[1], hold, changed)
	}
	out = addObjectOutput(cmd, "the annotated VolumePair")
	return cmd
}

// holdRefused says why node cannot be added to (hold) or removed from the
// hold list of vp.
func holdRefused(vp *storagev1alpha1.VolumePair, node string, hold bool) error {
	held := heldMembers(vp)
	if !hold {
		if slices.Contains(held, node) {
			return nil // a node no longer a member may still be listed
		}
		if !vp.Spec.IsMember(node) {
			return notAMember(vp, node)
		}
		list := "no member is held"
		if len(held) > 0 {
			list = "held: " + strings.Join(held, ", ")
		}
		return fmt.Errorf("%s is not held (%s): there is nothing to release", node, list)
	}
	if !vp.Spec.IsMember(node) {
		return notAMember(vp, node)
	}
	if node == vp.Status.ActivePrimary {
		return fmt.Errorf("%s is the writer (epoch %d): a hold keeps a member that returns to the writer out of resync, and the writer is never resynced. "+
			"If %s is lost, hold it once another member took over (kubectl tandem failover, or promote --force), before %s returns",
			node, vp.Status.Epoch, node, node)
	}
	return nil
}

// setHold adds node to, or removes it from, vp's hold list with a merge
// patch that keeps the other nodes, retrying when the VolumePair changed
// meanwhile. changed is false when there was nothing to do (already held).
func setHold(ctx context.Context, c client.Client, ns, name, node string, hold bool) (vp *storagev1alpha1.VolumePair, changed bool, err error) {
	verb := "hold"
	if !hold {
		verb = "release"
	}
	for attempt := 0; ; attempt++ {
		vp, err = getPair(ctx, c, ns, name)
		if err != nil {
			return nil, false, err
		}
		if err := holdRefused(vp, node, hold); err != nil {
			return nil, false, fmt.Errorf("%s of %s in volumepair %s/%s refused, nothing was changed: %w", verb, node, ns, vp.Name, err)
		}
		held := heldMembers(vp)
		if hold && slices.Contains(held, node) {
			return vp, false, nil
		}
		if hold {
			held = append(held, node)
		} else {
			held = slices.DeleteFunc(held, func(n string) bool { return n == node })
		}
		var value *string
		if len(held) > 0 {
			v := strings.Join(held, ",")
			value = &v
		}
		err = patchAnnotations(ctx, c, vp, map[string]*string{storagev1alpha1.AnnotationHoldResync: value}, true)
		if err == nil {
			return vp, true, nil
		}
		if !apierrors.IsConflict(err) || attempt >= 4 {
			return nil, false, fmt.Errorf("%s %s in volumepair %s/%s: %w", verb, node, ns, vp.Name, err)
		}
	}
}

// renderHold says what the hold or release does next.
func renderHold(w io.Writer, vp *storagev1alpha1.VolumePair, node string, hold, changed bool) error {
	ew := &errWriter{w: w}
	ns, name := vp.Namespace, vp.Name
	ann := storagev1alpha1.AnnotationHoldResync
	writer := vp.Status.ActivePrimary
	source := writer
	if source == "" {
		source = "the writer"
	}
	m := vp.Status.MemberStatus(node)
	switch {
	case hold && !changed:
		ew.printf("volumepair %s/%s: %s is already held out of resync (annotation %s=%s); nothing was changed\n\n", ns, name, node, ann, vp.Annotations[ann])
	case hold:
		ew.printf("volumepair %s/%s: %s held out of resync (annotation %s=%s)\n\n", ns, name, node, ann, vp.Annotations[ann])
	default:
		now := "removed: no member is held"
		if v, ok := vp.Annotations[ann]; ok {
			now = "now " + v
		}
		ew.printf("volumepair %s/%s: %s released (annotation %s %s)\n\n", ns, name, node, ann, now)
	}
	ew.printf("Now:  %s\n", stateSummary(vp))
	if hold {
		if m != nil && m.Connected && m.Role == storagev1alpha1.RoleBackup {
			ew.printf("Warning: %s is a connected backup now: the controller fences it at once, so it stops receiving %s's writes and the pair runs without that copy until you release it.\n", node, source)
		}
		ew.printf("Next: when %s returns (at once if it answers now), the controller fences it (role None) and keeps it out of resync: its data stays as it came back. "+
			"The pair is Degraded (ResyncHeld), and %s is never promoted automatically (FailoverBlocked: BackupHeld; kubectl tandem promote --force can still promote it).\n", node, node)
		ew.printf("      To look at its data: kubectl tandem verify %s -n %s lists the regions where the members differ; %s's replica files are on %s under the agent's data directory, "+
			"volumes/%s/%s (%s/volumes/%s/%s with the default --data-dir). Copy them before you release it if you want to keep them.\n",
			name, ns, node, node, ns, name, agentDataDir, ns, name)
		ew.printf("      To resync it, overwriting what it wrote since it left with %s's data: kubectl tandem release %s %s -n %s\n", source, name, node, ns)
	} else {
		ew.printf("Next: the controller makes %s a backup of %s and resyncs it: the regions where it differs are copied from %s, which overwrites what %s wrote since it left (those writes are lost). "+
			"A member that does not answer now is resynced when it returns.\n", node, source, source, node)
	}
	ew.printf("\nFollow it with: kubectl tandem status %s -n %s\n", name, ns)
	return ew.done()
}
