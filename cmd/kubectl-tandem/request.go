package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// request is a user action the controller carries out when it sees its
// annotation.
type request struct {
	verb       string
	annotation string
	short      string
	long       string
	// next explains what the controller does with the request, given the
	// pair's current state.
	next func(vp *storagev1alpha1.VolumePair) []string
	// refuse says why the request cannot be acted on in the pair's
	// current state (nil: it can). A refused request is not set: an
	// annotation nobody acts on would stay, and fire later, at a moment the
	// user did not choose.
	refuse func(vp *storagev1alpha1.VolumePair) error
}

var failoverRequest = request{
	verb:       "failover",
	annotation: storagev1alpha1.AnnotationFailoverRequested,
	short:      "Ask the controller to promote the backup of a VolumePair",
	long: `Ask the controller to promote the backup: sets the annotation
storage.tandem.dev/failover-requested to the current time (RFC 3339).

The controller promotes the backup when the primary is lost (its authority
has expired) and the backup is UpToDate; otherwise the FailoverBlocked
condition says why not. This is how a pair with spec.failover.policy Manual
fails over.

Failover is for a writer that is lost: while the writer serves (condition
Ready True) the request is refused and nothing is set. To move the writer
role while it serves (a planned switchover, no write lost), swap
spec.primary.node and spec.backup.node; to give it back to spec.primary
after a failover, use kubectl tandem failback.`,
	next:   failoverNext,
	refuse: failoverRefused,
}

var failbackRequest = request{
	verb:       "failback",
	annotation: storagev1alpha1.AnnotationFailbackRequested,
	short:      "Ask the controller to give the primary role back to the preferred primary",
	long: `Ask the controller to fail back: sets the annotation
storage.tandem.dev/failback-requested to the current time (RFC 3339).

Once the pair is NORMAL (the returning primary holds the same data as the
acting one), the controller holds new writes, drains the last diff, gives the
primary role back to spec.primary and resumes mirroring (PAIR). Held writes
wait; they do not fail. This is how a pair with spec.failback.policy Manual
fails back.

Failback is for a pair that failed over: while spec.primary serves the
request is refused and nothing is set. For a planned switchover to a backup,
swap spec.primary.node and spec.backup.node.`,
	next:   failbackNext,
	refuse: failbackRefused,
}

func newRequestCmd(o *rootOptions, r request) *cobra.Command {
	var out *outputFlags
	cmd := &cobra.Command{
		Use:     r.verb + " NAME",
		Short:   r.short,
		Long:    r.long,
		Example: fmt.Sprintf("  kubectl tandem %s db -n prod", r.verb),
		Args:    nameArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := out.objectPrinter()
			if err != nil {
				return err
			}
			c, vp, err := o.pair(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			ns := vp.Namespace
			if err := r.refuse(vp); err != nil {
				return fmt.Errorf("%s of volumepair %s/%s refused, nothing was changed: %w", r.verb, ns, vp.Name, err)
			}
			at := time.Now().UTC().Format(time.RFC3339)
			if err := annotate(cmd.Context(), c, vp, r.annotation, at); err != nil {
				return fmt.Errorf("request %s of volumepair %s/%s: %w", r.verb, ns, vp.Name, err)
			}
			if p != nil {
				return out.printObject(p, o.streams.Out, vp, volumePairGVK)
			}
			return renderRequest(o.streams.Out, r, vp, at)
		},
	}
	out = addObjectOutput(cmd, "the annotated VolumePair")
	return cmd
}

// annotate sets one annotation with a JSON merge patch; vp is updated with
// the server's answer.
func annotate(ctx context.Context, c client.Client, vp *storagev1alpha1.VolumePair, key, value string) error {
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{key: value}}})
	if err != nil {
		return fmt.Errorf("encode patch: %w", err)
	}
	if err := c.Patch(ctx, vp, client.RawPatch(types.MergePatchType, body)); err != nil {
		return fmt.Errorf("set annotation %s: %w", key, err)
	}
	return nil
}

func renderRequest(w io.Writer, r request, vp *storagev1alpha1.VolumePair, at string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "volumepair %s/%s: %s requested at %s (annotation %s)\n\n", vp.Namespace, vp.Name, r.verb, at, r.annotation)
	fmt.Fprintf(&b, "Now:  %s\n", stateSummary(vp))
	for i, line := range r.next(vp) {
		label := "      "
		if i == 0 {
			label = "Next: "
		}
		fmt.Fprintf(&b, "%s%s\n", label, line)
	}
	fmt.Fprintf(&b, "\nFollow it with: kubectl tandem status %s -n %s\n", vp.Name, vp.Namespace)
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write output: %w", err)
	}
	return nil
}

// stateSummary says in one line who serves and what the other member holds.
func stateSummary(vp *storagev1alpha1.VolumePair) string {
	st := &vp.Status
	if st.Phase == "" {
		return "the controller has not reported a status yet"
	}
	parts := []string{fmt.Sprintf("phase %s", st.Phase)}
	if st.ActivePrimary != "" {
		parts = append(parts, fmt.Sprintf("%s serves at epoch %d", st.ActivePrimary, st.Epoch))
	} else {
		parts = append(parts, "no member serves")
	}
	for _, m := range orderMembers(vp) {
		if m.Node == st.ActivePrimary {
			continue
		}
		conn := "disconnected"
		if m.Connected {
			conn = "connected"
		}
		parts = append(parts, fmt.Sprintf("%s is %s, %s, %s", m.Node, orDash(string(m.Role)), orDash(string(m.DataState)), conn))
	}
	return strings.Join(parts, "; ")
}

// actingPrimary is who serves now, or the preferred primary when unknown.
func actingPrimary(vp *storagev1alpha1.VolumePair) string {
	if vp.Status.ActivePrimary != "" {
		return vp.Status.ActivePrimary
	}
	return vp.Spec.Primary.Node
}

func failoverNext(vp *storagev1alpha1.VolumePair) []string {
	primary := actingPrimary(vp)
	var backups []string
	for _, n := range vp.Spec.MemberNodes() {
		if n != primary {
			backups = append(backups, n)
		}
	}
	var out []string
	if len(backups) == 1 {
		out = append(out, fmt.Sprintf("the controller promotes %s once the primary %s is lost and %s is UpToDate; otherwise the FailoverBlocked condition says why.", backups[0], primary, backups[0]))
	} else {
		out = append(out, fmt.Sprintf("the controller promotes the most current UpToDate backup of %s once the primary %s is lost; otherwise the FailoverBlocked condition says why.", strings.Join(backups, ", "), primary))
	}
	for _, backup := range backups {
		if m := vp.Status.MemberStatus(backup); m != nil && m.DataState != "" && m.DataState != storagev1alpha1.DataUpToDate {
			out = append(out, fmt.Sprintf("Warning: %s is %s now; it is not promoted while its data is not UpToDate.", backup, m.DataState))
		}
	}
	if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionFailoverBlocked); c != nil && c.Status == metav1.ConditionTrue {
		out = append(out, fmt.Sprintf("FailoverBlocked now: %s: %s", orDash(c.Reason), orDash(oneLine(c.Message))))
	}
	if primary != vp.Spec.Primary.Node {
		out = append(out, fmt.Sprintf("Note: the backup %s already serves; to give the role back to %s, use kubectl tandem failback.", primary, vp.Spec.Primary.Node))
	}
	if vp.Spec.Failover.Policy == storagev1alpha1.PolicyAutomatic {
		out = append(out, "spec.failover.policy is Automatic: the controller also fails over without a request.")
	}
	return out
}

func failbackNext(vp *storagev1alpha1.VolumePair) []string {
	pref := vp.Spec.Primary.Node
	st := &vp.Status
	out := []string{fmt.Sprintf("once the pair is NORMAL, the controller holds new writes, drains the last diff, gives the primary role back to %s and resumes mirroring (PAIR); held writes wait, they do not fail.", pref)}
	switch {
	case st.Phase == storagev1alpha1.PhaseNormal:
		out = append(out, "The pair is NORMAL: the failback can start now.")
	case st.Phase == storagev1alpha1.PhaseCopy:
		progress := ""
		if st.Copy != nil {
			progress = " (" + copyLine(st.Copy, time.Now()) + ")"
		}
		out = append(out, "A copy is running"+progress+"; the failback follows when it completes.")
	case st.Phase == storagev1alpha1.PhaseSwap:
		out = append(out, fmt.Sprintf("The pair is in SWAP: the failback waits for %s to return and for the resync (COPY) to finish.", pref))
	}
	if vp.Spec.Failback.Policy == storagev1alpha1.PolicyAutomatic {
		out = append(out, "spec.failback.policy is Automatic: the controller also fails back without a request.")
	}
	return out
}

// notReported refuses a request for a pair the controller has not reported
// on: there is no writer to lose or to give the role back from.
func notReported(vp *storagev1alpha1.VolumePair) error {
	if vp.DeletionTimestamp != nil {
		return fmt.Errorf("the VolumePair is being deleted (since %s)", vp.DeletionTimestamp.UTC().Format(time.RFC3339))
	}
	if vp.Status.Phase == "" && vp.Status.ActivePrimary == "" {
		return fmt.Errorf("the controller has not reported a status for it yet, so no member is the writer: "+
			"is the Tandem manager running (kubectl tandem version)? kubectl tandem status %s -n %s shows its conditions", vp.Name, vp.Namespace)
	}
	if vp.Status.ActivePrimary == "" {
		why := ""
		if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionReady); c != nil {
			why = fmt.Sprintf(" (condition Ready: %s, %s)", orDash(c.Reason), orDash(oneLine(c.Message)))
		}
		return fmt.Errorf("no member has been the writer yet%s, so there is none to take the role from: "+
			"kubectl tandem status %s -n %s shows what the pair waits for", why, vp.Name, vp.Namespace)
	}
	return nil
}

// switchoverCommand is the command that moves the writer role from the
// acting primary to the spec backup while it serves: swap the two members.
func switchoverCommand(vp *storagev1alpha1.VolumePair) string {
	p, b := vp.Spec.Primary.Node, vp.Spec.Backup.Node
	return fmt.Sprintf(`kubectl patch volumepair %s -n %s --type=merge -p '{"spec":{"primary":{"node":"%s"},"backup":{"node":"%s"}}}'`, vp.Name, vp.Namespace, b, p)
}

// failoverRefused refuses a failover while the writer serves: the
// controller acts on the request only once the writer is lost.
func failoverRefused(vp *storagev1alpha1.VolumePair) error {
	if err := notReported(vp); err != nil {
		return err
	}
	ready := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionReady)
	if ready == nil || ready.Status != metav1.ConditionTrue {
		return nil
	}
	writer := actingPrimary(vp)
	why := fmt.Sprintf("the writer %s is serving (condition Ready: %s, %s): failover is for a writer that is lost, and the request would not be acted on", writer, orDash(ready.Reason), orDash(oneLine(ready.Message)))
	var do string
	if writer != vp.Spec.Primary.Node {
		do = fmt.Sprintf("%s already took over from %s; to give the writer role back to %s, use kubectl tandem failback %s -n %s", writer, vp.Spec.Primary.Node, vp.Spec.Primary.Node, vp.Name, vp.Namespace)
	} else {
		do = fmt.Sprintf("For a planned switch of the writer to %s while %s serves (writes are held and drained: none is lost), swap spec.primary.node and spec.backup.node: %s", vp.Spec.Backup.Node, writer, switchoverCommand(vp))
	}
	return fmt.Errorf("%s. %s. If %s was lost just now, the controller notices within spec.failover.failureThreshold × probePeriodSeconds; run this again once kubectl tandem status %s -n %s shows Ready False",
		why, do, writer, vp.Name, vp.Namespace)
}

// failbackRefused refuses a failback while spec.primary holds the writer
// role: there is nothing to give back, and a request left set would fail a
// later failover back at once, whatever spec.failback.policy says.
func failbackRefused(vp *storagev1alpha1.VolumePair) error {
	if err := notReported(vp); err != nil {
		return err
	}
	pref := vp.Spec.Primary.Node
	if vp.Status.ActivePrimary != pref {
		return nil
	}
	return fmt.Errorf("%s (spec.primary) is already the writer (phase %s): failback gives the writer role back to spec.primary after a failover, and there is nothing to give back. "+
		"For a planned switch of the writer to %s, swap spec.primary.node and spec.backup.node: %s", pref, orDash(string(vp.Status.Phase)), vp.Spec.Backup.Node, switchoverCommand(vp))
}
