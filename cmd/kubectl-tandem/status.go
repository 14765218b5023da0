package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// maxEvents is how many of the latest events status shows.
const maxEvents = 10

func newStatusCmd(o *rootOptions) *cobra.Command {
	var out *outputFlags
	cmd := &cobra.Command{
		Use:   "status NAME",
		Short: "Show a VolumePair's phase, roles, diff, copy progress, members, conditions and events",
		Long: `Show a VolumePair as the controller reports it: mode, preferred and acting
primary, phase (PAIR, SWAP, COPY, NORMAL), epoch, NBD endpoint, what is out of
sync, the progress of a running copy, each member's state, the conditions, the
last failover and failback, and the latest events.

With -o it prints the VolumePair object instead, in any of kubectl get's
formats: json, yaml, name, jsonpath=..., go-template=...`,
		Example: `  kubectl tandem status db -n prod
  kubectl tandem status db -o yaml
  kubectl tandem status db -o jsonpath='{.status.phase}{"\n"}'`,
		Args: nameArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := out.objectPrinter()
			if err != nil {
				return err
			}
			c, vp, err := o.pair(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if p != nil {
				return out.printObject(p, o.streams.Out, vp, volumePairGVK)
			}
			events, evErr := pairEvents(cmd.Context(), c, vp)
			return renderStatus(o.streams.Out, vp, events, evErr, time.Now())
		},
	}
	out = addObjectOutput(cmd, "the VolumePair object")
	return cmd
}

// pairEvents lists the core/v1 Events about vp, oldest first.
func pairEvents(ctx context.Context, c client.Client, vp *storagev1alpha1.VolumePair) ([]corev1.Event, error) {
	var list corev1.EventList
	err := c.List(ctx, &list, client.InNamespace(vp.Namespace), client.MatchingFields{
		"involvedObject.kind": "VolumePair",
		"involvedObject.name": vp.Name,
	})
	if err != nil {
		return nil, fmt.Errorf("list events of volumepair %s/%s: %w", vp.Namespace, vp.Name, err)
	}
	return selectEvents(list.Items, vp, maxEvents), nil
}

// selectEvents keeps the events about vp itself (not an earlier object of the
// same name), sorted by time, the latest limit of them.
func selectEvents(events []corev1.Event, vp *storagev1alpha1.VolumePair, limit int) []corev1.Event {
	var out []corev1.Event
	for _, e := range events {
		ref := e.InvolvedObject
		if ref.Kind != "VolumePair" || ref.Name != vp.Name {
			continue
		}
		if ref.UID != "" && vp.UID != "" && ref.UID != vp.UID {
			continue
		}
		if gv := ref.APIVersion; gv != "" && !strings.HasPrefix(gv, storagev1alpha1.GroupVersion.Group+"/") {
			continue
		}
		out = append(out, e)
	}
	slices.SortStableFunc(out, func(a, b corev1.Event) int { return eventTime(a).Compare(eventTime(b)) })
	if len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}

// eventTime is when an event last happened.
func eventTime(e corev1.Event) time.Time {
	switch {
	case e.Series != nil && !e.Series.LastObservedTime.IsZero():
		return e.Series.LastObservedTime.Time
	case !e.LastTimestamp.IsZero():
		return e.LastTimestamp.Time
	case !e.EventTime.IsZero():
		return e.EventTime.Time
	case !e.FirstTimestamp.IsZero():
		return e.FirstTimestamp.Time
	}
	return e.CreationTimestamp.Time
}

// eventFirstTime is when an event first happened.
func eventFirstTime(e corev1.Event) time.Time {
	switch {
	case !e.FirstTimestamp.IsZero():
		return e.FirstTimestamp.Time
	case !e.EventTime.IsZero():
		return e.EventTime.Time
	}
	return eventTime(e)
}

// eventCount is how many times an event happened.
func eventCount(e corev1.Event) int32 {
	if e.Series != nil && e.Series.Count > 0 {
		return e.Series.Count
	}
	return e.Count
}

// renderStatus writes the readable view of vp. events are shown as given
// (see selectEvents); evErr, when set, explains why there are none.
func renderStatus(w io.Writer, vp *storagev1alpha1.VolumePair, events []corev1.Event, evErr error, now time.Time) error {
	ew := &errWriter{w: w}
	st := &vp.Status
	field := func(k, v string) { ew.printf("%-18s%s\n", k+":", v) }

	field("Name", vp.Name)
	field("Namespace", vp.Namespace)
	field("Mode", string(vp.Spec.Mode))
	size := fmt.Sprintf("%s in regions of %s", humanBytes(vp.Spec.SizeBytes()), humanBytes(vp.Spec.RegionSizeBytes()))
	if st.Size != nil && st.Size.Value() != vp.Spec.SizeBytes() {
		size += fmt.Sprintf(" (the writer serves %s: growing, see the Expanding condition)", humanBytes(st.Size.Value()))
	}
	field("Size", size)
	field("Primary (spec)", vp.Spec.Primary.Node)
	field("Backup (spec)", vp.Spec.Backup.Node)
	if len(vp.Spec.AdditionalBackups) > 0 {
		var more []string
		for _, b := range vp.Spec.AdditionalBackups {
			more = append(more, fmt.Sprintf("%s (%s)", b.Node, vp.Spec.ModeOf(b.Node)))
		}
		field("More backups", strings.Join(more, ", "))
	}
	if st.MembersInSync != "" {
		field("In sync", st.MembersInSync+" members hold the writer's data")
	}
	if st.Phase == "" {
		field("Phase", "<none>: the controller has not reported a status yet")
	} else {
		field("Phase", string(st.Phase)+" ("+phaseMeaning(st.Phase)+")")
	}
	active := orDash(st.ActivePrimary)
	if st.ActivePrimary != "" && st.ActivePrimary != vp.Spec.Primary.Node {
		active += " (the backup is acting primary)"
	}
	field("Active primary", active)
	field("Epoch", fmt.Sprint(st.Epoch))
	field("Endpoint", orDash(st.Endpoint))
	oos := humanBytes(st.OutOfSyncBytes)
	if st.OutOfSyncBytes >= 1024 {
		oos += fmt.Sprintf(" (%d bytes)", st.OutOfSyncBytes)
	}
	field("Out of sync", oos)
	if st.UnmergedRegions > 0 {
		field("Unmerged", fmt.Sprintf("%d regions differ between the members (writes never copied: spec.resync.mergePrimaryBitmap is false); kubectl tandem verify --repair makes them identical", st.UnmergedRegions))
	}
	if st.Copy != nil {
		field("Copy", copyLine(st.Copy, now))
	} else {
		field("Copy", "none running")
	}
	field("Last failover", timestamp(st.LastFailoverTime, now))
	field("Last failback", timestamp(st.LastFailbackTime, now))
	if f := st.LastForcePromotion; f != nil {
		field("Forced promotion", forcePromotionLine(f, now))
	}
	field("Failover policy", string(vp.Spec.Failover.Policy))
	field("Failback policy", string(vp.Spec.Failback.Policy))
	for _, a := range []struct{ key, label string }{
		{storagev1alpha1.AnnotationFailoverRequested, "Failover request"},
		{storagev1alpha1.AnnotationFailbackRequested, "Failback request"},
	} {
		if v, ok := vp.Annotations[a.key]; ok {
			field(a.label, v+" (annotation "+a.key+")")
		}
	}
	if v, ok := vp.Annotations[storagev1alpha1.AnnotationForcePromote]; ok {
		by := vp.Annotations[storagev1alpha1.AnnotationForcePromoteBy]
		if by != "" {
			by = ", requested by " + by
		}
		field("Force request", fmt.Sprintf("%s%s (annotation %s): promoted once the writer is lost and its authority expired, even if it lacks acknowledged writes",
			v, by, storagev1alpha1.AnnotationForcePromote))
	}
	if held := heldMembers(vp); len(held) > 0 {
		field("Held", fmt.Sprintf("%s (annotation %s): fenced and kept out of resync, data as it came back; kubectl tandem release %s NODE -n %s resyncs one",
			strings.Join(held, ", "), storagev1alpha1.AnnotationHoldResync, vp.Name, vp.Namespace))
	}
	if vp.DeletionTimestamp != nil {
		field("Deleting", fmt.Sprintf("since %s: the controller closes the replicas and deletes their files (finalizer %s; annotation %s=true keeps them); "+
			"a member it cannot reach keeps its files (event TeardownIncomplete). If this stays, is the Tandem manager running (kubectl tandem version)?",
			timestamp(vp.DeletionTimestamp, now), storagev1alpha1.Finalizer, storagev1alpha1.AnnRetainData))
	}
	if st.ObservedGeneration != 0 && st.ObservedGeneration != vp.Generation {
		field("Observed", fmt.Sprintf("generation %d of %d: the status does not reflect the latest spec yet", st.ObservedGeneration, vp.Generation))
	}

	ew.printf("\nMembers:\n")
	if len(st.Members) == 0 {
		ew.printf("  <none reported>\n")
	} else {
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  NODE\tROLE\tDATA STATE\tCONNECTED\tLAST SEEN\tOUT OF SYNC\tMESSAGE")
		for _, m := range orderMembers(vp) {
			conn := "no"
			if m.Connected {
				conn = "yes"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Node, orDash(string(m.Role)), orDash(string(m.DataState)),
				conn, ago(m.LastSeen, now), humanBytes(m.OutOfSyncBytes), orDash(oneLine(m.Message)))
		}
		_ = tw.Flush()
	}

	if len(st.RemovedMembers) > 0 {
		ew.printf("\nRemoved members (replaced; their replicas are still to be deleted):\n")
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  NODE\tWAITING FOR")
		for _, m := range st.RemovedMembers {
			fmt.Fprintf(tw, "  %s\t%s\n", m.Node, orDash(oneLine(m.Message)))
		}
		_ = tw.Flush()
	}

	ew.printf("\nConditions:\n")
	if len(st.Conditions) == 0 {
		ew.printf("  <none>\n")
	} else {
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  TYPE\tSTATUS\tREASON\tSINCE\tMESSAGE")
		for _, c := range st.Conditions {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", c.Type, c.Status, orDash(c.Reason), ago(&c.LastTransitionTime, now), orDash(oneLine(c.Message)))
		}
		_ = tw.Flush()
	}

	ew.printf("\nEvents:\n")
	switch {
	case evErr != nil:
		ew.printf("  <unavailable: %s>\n", oneLine(evErr.Error()))
	case len(events) == 0:
		ew.printf("  <none>\n")
	default:
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  TYPE\tREASON\tAGE\tFROM\tMESSAGE")
		for _, e := range events {
			age := humanDuration(now.Sub(eventTime(e)))
			if n := eventCount(e); n > 1 {
				age += fmt.Sprintf(" (x%d over %s)", n, humanDuration(now.Sub(eventFirstTime(e))))
			}
			from := e.Source.Component
			if from == "" {
				from = e.ReportingController
			}
			if e.Source.Host != "" {
				from += ", " + e.Source.Host
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", orDash(e.Type), orDash(e.Reason), age, orDash(from), orDash(oneLine(e.Message)))
		}
		_ = tw.Flush()
	}
	if ew.err != nil {
		return fmt.Errorf("write status: %w", ew.err)
	}
	return nil
}

// phaseMeaning explains a phase in a few words (docs/architecture.md, "Phases").
func phaseMeaning(p storagev1alpha1.Phase) string {
	switch p {
	case storagev1alpha1.PhasePending:
		return "a new pair waits: a member's node does not exist or has no agent, or spec.primary's agent does not answer; condition Ready says which"
	case storagev1alpha1.PhasePair:
		return "the preferred primary serves and mirrors to the backup"
	case storagev1alpha1.PhaseSwap:
		return "the primary was lost; the backup serves and records what it writes"
	case storagev1alpha1.PhaseCopy:
		return "a copy towards a member is running"
	case storagev1alpha1.PhaseNormal:
		return "both members identical, the backup still serves; failback is next"
	}
	return "unknown phase"
}

// forcePromotionLine describes status.lastForcePromotion.
func forcePromotionLine(f *storagev1alpha1.ForcePromotion, now time.Time) string {
	t := f.Time
	s := fmt.Sprintf("%s at epoch %d, %s", f.Node, f.Epoch, timestamp(&t, now))
	if f.From != "" {
		s += ", in place of " + f.From
	}
	if f.RequestedBy != "" {
		s += ", requested by " + f.RequestedBy
	}
	if f.BlockedBy != "" {
		s += ", overriding " + f.BlockedBy
	} else {
		s += ", overriding nothing"
	}
	return s
}

// orderMembers lists the reported members: spec primary, spec backup, the
// additional backups, others.
func orderMembers(vp *storagev1alpha1.VolumePair) []storagev1alpha1.MemberStatus {
	out := slices.Clone(vp.Status.Members)
	rank := func(node string) int {
		if i := slices.Index(vp.Spec.MemberNodes(), node); i >= 0 {
			return i
		}
		return len(vp.Spec.MemberNodes())
	}
	slices.SortStableFunc(out, func(a, b storagev1alpha1.MemberStatus) int { return rank(a.Node) - rank(b.Node) })
	return out
}

// errWriter remembers the first write error so rendering code stays linear.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}

func (e *errWriter) printf(format string, args ...any) { _, _ = fmt.Fprintf(e, format, args...) }
