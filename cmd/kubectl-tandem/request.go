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
	"k8s.io/cli-runtime/pkg/printers"
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
fails over.`,
	next: failoverNext,
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
fails back.`,
	next: failbackNext,
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
			var p printers.ResourcePrinter
			if !out.human() {
				var err error
				if p, err = out.printer(); err != nil {
					return err
				}
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			c, err := o.newClient()
			if err != nil {
				return err
			}
			vp, err := getPair(cmd.Context(), c, ns, args[0])
			if err != nil {
				return err
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
	case st.Phase == storagev1alpha1.PhasePair && actingPrimary(vp) == pref:
		out = append(out, fmt.Sprintf("%s already serves (PAIR): there is nothing to fail back now.", pref))
	}
	if vp.Spec.Failback.Policy == storagev1alpha1.PolicyAutomatic {
		out = append(out, "spec.failback.policy is Automatic: the controller also fails back without a request.")
	}
	return out
}
