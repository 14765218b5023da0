package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// reasonRequestIgnored is the reason of the event the controller records
// when it clears a request it cannot act on (controllers.ReasonRequestIgnored).
const reasonRequestIgnored = "RequestIgnored"

// defaultPollInterval is how often promote --force reads the VolumePair
// while it waits for the controller.
const defaultPollInterval = time.Second

// exitPending is promote --force's exit status when the request is still
// set, not acted on, after --wait.
const exitPending = 2

type promoteOptions struct {
	force bool
	wait  time.Duration
	// holdOldWriter adds the lost writer to the hold-resync list with the
	// request.
	holdOldWriter bool
}

func newPromoteCmd(o *rootOptions) *cobra.Command {
	var po promoteOptions
	cmd := &cobra.Command{
		Use:   "promote NAME NODE",
		Short: "Force-promote a member of a VolumePair whose writer is lost for good (disaster recovery: may discard acknowledged writes)",
		Long: `Promote NODE to writer although it may lack writes the lost writer
acknowledged: disaster recovery for a writer whose node is gone for good,
when the controller will not promote NODE by itself because its data is
Outdated, it is an Async backup of a pair with Sync members, it is held
out of resync (kubectl tandem hold), or spec.failover.policy is Manual.

Without --force it changes nothing: it prints what would be lost, from the
pair's status, and exits 1. With --force it sets the annotations
storage.tandem.dev/force-promote=NODE and storage.tandem.dev/force-promote-by
(the user your credentials authenticate as, from the API server's
SelfSubjectReview), then waits up to --wait for the controller:

  - promoted: status.lastForcePromotion records NODE, the writer it replaced,
    the epoch, who asked and what it overrode (event ForcePromoted); exit 0.
  - ignored: the controller cleared the request (event RequestIgnored) because
    the writer serves again, or NODE became the writer; exit 1.
  - still waiting after --wait: the request stays set and the controller
    promotes NODE once it can (FailoverBlocked says what it waits for, e.g.
    the lost writer's authority Lease to expire), or clears it after 10
    minutes without acting; exit 2.

The controller never promotes a member whose data is Inconsistent (a copy
towards it did not finish), one whose agent does not answer, or one while
the lost writer's authority has not expired (it might still be writing).

What NODE lacks is lost for good: when the old writer returns it is resynced
from NODE, which overwrites what it wrote after NODE stopped receiving its
writes. To look at its data before that happens, add --hold-old-writer: it
is then held out of resync (as kubectl tandem hold does) from the moment NODE
is promoted, until kubectl tandem release.

Refused, with nothing set: NODE is not a member, NODE is the writer, the
writer serves (condition Ready True: use a switchover instead), NODE's data
is Inconsistent, or the controller never reported a writer.`,
		Example: `  # What would be lost (changes nothing):
  kubectl tandem promote db node-b -n prod
  # Promote node-b, discarding what node-a acknowledged that node-b lacks:
  kubectl tandem promote db node-b -n prod --force
  # Set the request and return at once:
  kubectl tandem promote db node-b -n prod --force --wait=0`,
		Args: nameNodeArgs,
		ValidArgsFunction: o.completeMembers(func(vp *storagev1alpha1.VolumePair, node string) bool {
			return node != vp.Status.ActivePrimary
		}),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.runPromote(cmd.Context(), args[0], args[1], po)
		},
	}
	cmd.Flags().BoolVar(&po.force, "force", false, "Set the force-promote request: promote NODE even if that discards writes the lost writer acknowledged. Without it nothing is changed.")
	cmd.Flags().BoolVar(&po.holdOldWriter, "hold-old-writer", false, "With --force, also hold the lost writer out of resync (storage.tandem.dev/hold-resync), from the moment NODE is promoted: when it returns it stays fenced with its data as it came back, for you to look at before kubectl tandem release resyncs it.")
	cmd.Flags().DurationVar(&po.wait, "wait", 60*time.Second, "How long --force waits for the controller to promote NODE or ignore the request (0: set it and return).")
	return cmd
}

func (o *rootOptions) runPromote(ctx context.Context, name, node string, po promoteOptions) error {
	c, vp, err := o.pair(ctx, name)
	if err != nil {
		return err
	}
	ns := vp.Namespace
	if err := promoteRefused(vp, node); err != nil {
		return fmt.Errorf("promote of %s in volumepair %s/%s refused, nothing was changed: %w", node, ns, vp.Name, err)
	}
	warning := lossWarning(vp, node, time.Now())
	if !po.force {
		if _, err := io.WriteString(o.streams.ErrOut, warning+"\n"); err != nil {
			return fmt.Errorf("write output: %w", err)
		}
		return fmt.Errorf("promote of %s in volumepair %s/%s refused without --force, nothing was changed: it may discard writes %s acknowledged (above). "+
			"If %s is gone for good, run: kubectl tandem promote %s %s -n %s --force",
			node, ns, vp.Name, actingPrimary(vp), actingPrimary(vp), vp.Name, node, ns)
	}
	ew := &errWriter{w: o.streams.Out}
	ew.printf("%s\n", warning)

	by, note := whoAmI(ctx, c)
	if note != "" {
		fmt.Fprintf(o.streams.ErrOut, "note: %s\n", note)
	}
	// What is there before the request, to tell the controller's answer
	// from what happened earlier (no clock is compared: the client's and the
	// controller's may differ).
	seen := map[string]int32{}
	events, evErr := pairEvents(ctx, c, vp)
	for _, e := range events {
		seen[string(e.UID)+"/"+e.Name] = eventCount(e)
	}
	before := vp.Status.LastForcePromotion.DeepCopy()
	replaced := vp.Annotations[storagev1alpha1.AnnotationForcePromote]
	var holding string // the old writer, when this request adds it to the hold list
	for attempt := 0; ; attempt++ {
		set := map[string]*string{
			storagev1alpha1.AnnotationForcePromote:   &node,
			storagev1alpha1.AnnotationForcePromoteBy: &by,
		}
		// The controller holds no authority holder, so the old writer,
		// held in the same patch, is held from the moment NODE takes over:
		// no window in which it could return and be resynced first.
		holding = ""
		if old := vp.Status.ActivePrimary; po.holdOldWriter && !slices.Contains(heldMembers(vp), old) {
			held := strings.Join(append(heldMembers(vp), old), ",")
			set[storagev1alpha1.AnnotationHoldResync] = &held
			holding = old
		}
		// A hold list read, modified and written back is guarded against
		// a concurrent change (Conflict: read it again).
		err := patchAnnotations(ctx, c, vp, set, holding != "")
		if err == nil {
			break
		}
		if holding == "" || !apierrors.IsConflict(err) || attempt >= 4 {
			return fmt.Errorf("request the force-promote of %s in volumepair %s/%s: %w", node, ns, vp.Name, err)
		}
		if vp, err = getPair(ctx, c, ns, name); err != nil {
			return err
		}
		if err := promoteRefused(vp, node); err != nil {
			return fmt.Errorf("promote of %s in volumepair %s/%s refused, nothing was changed: %w", node, ns, vp.Name, err)
		}
	}
	ew.printf("volumepair %s/%s: force-promote of %s requested by %s (annotations %s=%s, %s)\n", ns, vp.Name, node, by,
		storagev1alpha1.AnnotationForcePromote, node, storagev1alpha1.AnnotationForcePromoteBy)
	if replaced != "" && replaced != node {
		ew.printf("It replaces the pending force-promote of %s.\n", replaced)
	}
	if holding != "" {
		ew.printf("%s is held out of resync from the moment %s is promoted (annotation %s=%s): when it returns it stays fenced with its data as it came back; "+
			"kubectl tandem release %s %s -n %s resyncs it.\n", holding, node, storagev1alpha1.AnnotationHoldResync, vp.Annotations[storagev1alpha1.AnnotationHoldResync], vp.Name, holding, ns)
	}
	if po.wait <= 0 {
		ew.printf("Not waiting (--wait=0): the controller promotes %s once %s is lost and its authority expired, or clears the request (event RequestIgnored).\n"+
			"Follow it with: kubectl tandem status %s -n %s\n", node, actingPrimary(vp), vp.Name, ns)
		return ew.done()
	}
	ew.printf("Waiting up to %s for the controller...\n", po.wait)
	if ew.err != nil {
		return fmt.Errorf("write output: %w", ew.err)
	}
	res, err := o.waitForcePromotion(ctx, c, vp, node, before, seen, evErr == nil, po.wait)
	if err != nil {
		return err
	}
	return res.report(o.streams.Out, vp, node)
}

// promoteRefused says why a force-promote of node cannot be acted on in
// vp's current state (nil: it can). Like failover's refusals, it mirrors
// what the controller would clear with a RequestIgnored event, and adds
// what it would never do (an Inconsistent member).
func promoteRefused(vp *storagev1alpha1.VolumePair, node string) error {
	if err := notReported(vp); err != nil {
		return err
	}
	if !vp.Spec.IsMember(node) {
		return notAMember(vp, node)
	}
	writer := vp.Status.ActivePrimary
	ready := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionReady)
	serving := ready != nil && ready.Status == metav1.ConditionTrue
	if node == writer {
		others := slices.DeleteFunc(vp.Spec.MemberNodes(), func(n string) bool { return n == writer })
		if serving {
			return fmt.Errorf("%s is already the writer and serves (epoch %d, phase %s): there is nothing to promote", node, vp.Status.Epoch, orDash(string(vp.Status.Phase)))
		}
		return fmt.Errorf("%s is the writer (it holds the authority at epoch %d): a promotion makes another member the writer in its place. If %s is lost for good, promote one of %s",
			node, vp.Status.Epoch, node, strings.Join(others, ", "))
	}
	if serving {
		why := fmt.Sprintf("the writer %s is serving (condition Ready: %s, %s): a force-promote replaces a writer that is lost for good, and the controller would ignore it", writer, orDash(ready.Reason), orDash(oneLine(ready.Message)))
		var do string
		if node == vp.Spec.Backup.Node && writer == vp.Spec.Primary.Node {
			do = fmt.Sprintf("For a planned switch of the writer to %s while %s serves (writes are held and drained: none is lost), swap spec.primary.node and spec.backup.node: %s", node, writer, switchoverCommand(vp))
		} else {
			do = fmt.Sprintf("For a planned switch of the writer to %s while %s serves (none is lost), make %s spec.primary.node (a switchover)", node, writer, node)
		}
		return fmt.Errorf("%s. %s. If %s was lost just now, the controller notices within spec.failover.failureThreshold × probePeriodSeconds; run this again once kubectl tandem status %s -n %s shows Ready False",
			why, do, writer, vp.Name, vp.Namespace)
	}
	if m := vp.Status.MemberStatus(node); m != nil && m.DataState == storagev1alpha1.DataInconsistent {
		msg := ""
		if m.Message != "" {
			msg = " (" + oneLine(m.Message) + ")"
		}
		return fmt.Errorf("the replica on %s is Inconsistent%s: a copy towards it did not finish, so it holds no usable image of the volume, and the controller never promotes it, even by force. "+
			"Bring %s back, or promote a member whose data is UpToDate or Outdated", node, msg, writer)
	}
	return nil
}

// lossWarning says, from vp's status, what force-promoting node discards:
// the writes the lost writer acknowledged after node stopped receiving
// them. Like DRBD's forced primary on data it cannot vouch for, the
// promoted member's data becomes the volume's, and the returning writer's
// divergent writes are discarded when it resyncs from it.
func lossWarning(vp *storagev1alpha1.VolumePair, node string, now time.Time) string {
	writer := actingPrimary(vp)
	st := &vp.Status
	m := st.MemberStatus(node)
	var b strings.Builder
	fmt.Fprintf(&b, "WARNING: promoting %s by force makes the data %s holds now the volume's data, as it is.\n", node, node)
	fmt.Fprintf(&b, "Writes that %s (the lost writer) acknowledged after %s stopped receiving them are lost for good:\n", writer, node)
	var why []string
	switch {
	case m == nil || m.DataState == "":
		why = append(why, fmt.Sprintf("the controller has no report of %s's data: it cannot say what %s lacks", node, node))
	case m.DataState == storagev1alpha1.DataOutdated:
		why = append(why, fmt.Sprintf("%s is Outdated: %s went on writing without it after their link broke", node, writer))
	}
	if vp.Spec.ModeOf(node) == storagev1alpha1.ModeAsync {
		why = append(why, fmt.Sprintf("%s is an Async backup: %s acknowledged each write before %s held it, so its last writes may never have reached %s", node, writer, node, node))
	}
	if m != nil && m.OutOfSyncBytes > 0 {
		why = append(why, fmt.Sprintf("%s last reported that %s lacks %s of its data (status.members[].outOfSyncBytes); what it wrote after that report is missing too", writer, node, bytesExact(m.OutOfSyncBytes)))
	}
	if slices.Contains(heldMembers(vp), node) {
		why = append(why, fmt.Sprintf("%s is held out of resync (%s): its data is as it came back, without what %s wrote meanwhile", node, storagev1alpha1.AnnotationHoldResync, writer))
	}
	if c := meta.FindStatusCondition(st.Conditions, storagev1alpha1.ConditionSynchronized); c != nil && c.Status == metav1.ConditionFalse {
		why = append(why, fmt.Sprintf("the members have not been in sync since %s; condition Synchronized: %s", timestamp(&c.LastTransitionTime, now), orDash(c.Reason)))
	}
	if len(why) == 0 {
		why = append(why, fmt.Sprintf("none that the status shows: %s was %s and %s when last seen, so it should hold every write %s acknowledged; --force overrides what blocks the promotion (%s)",
			node, string(m.DataState), vp.Spec.ModeOf(node), writer, blockedReason(vp)))
	}
	var w *storagev1alpha1.MemberStatus
	if writer != "" {
		w = st.MemberStatus(writer)
	}
	for _, line := range why {
		fmt.Fprintf(&b, "  - %s.\n", line)
	}
	fmt.Fprintf(&b, "  - the controller last heard from %s %s and from %s %s.\n", writer, lastSeen(w, now), node, lastSeen(m, now))
	fmt.Fprintf(&b, "When %s returns it is resynced from %s: what it wrote that %s lacks is overwritten, as DRBD's discard-my-data does to a split-brain victim. "+
		"To look at its data first, keep it out of resync: add --hold-old-writer (or kubectl tandem hold %s %s -n %s once %s is promoted, before %s returns).\n", writer, node, node, vp.Name, writer, vp.Namespace, node, writer)
	fmt.Fprintf(&b, "Applications see the volume as %s holds it: a filesystem or database on it may need its crash recovery (fsck, journal replay).\n", node)
	fmt.Fprintf(&b, "Do this only if %s is gone for good, or the volume being down costs more than its last writes: bringing %s back loses nothing.", writer, writer)
	return b.String()
}

// lastSeen is when the controller last heard from a member's agent.
func lastSeen(m *storagev1alpha1.MemberStatus, now time.Time) string {
	if m == nil || m.LastSeen == nil {
		return "never (no report)"
	}
	return timestamp(m.LastSeen, now)
}

// bytesExact is a size in readable units, with the exact count when that
// differs.
func bytesExact(n int64) string {
	if n < 1024 {
		return humanBytes(n)
	}
	return fmt.Sprintf("%s (%d bytes)", humanBytes(n), n)
}

// blockedReason is the FailoverBlocked condition's reason, or what says
// nothing blocks.
func blockedReason(vp *storagev1alpha1.VolumePair) string {
	if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionFailoverBlocked); c != nil && c.Status == metav1.ConditionTrue {
		return "FailoverBlocked: " + orDash(c.Reason)
	}
	return "no FailoverBlocked condition now"
}

// whoAmI is the user the client's credentials authenticate as, from a
// SelfSubjectReview (authentication.k8s.io/v1), or "unknown" and a note
// saying why not.
func whoAmI(ctx context.Context, c client.Client) (user, note string) {
	r := &authenticationv1.SelfSubjectReview{}
	if err := c.Create(ctx, r); err != nil {
		return "unknown", fmt.Sprintf("could not learn the user your credentials authenticate as (SelfSubjectReview: %v); the request is recorded as by \"unknown\"", err)
	}
	if u := r.Status.UserInfo.Username; u != "" {
		return u, ""
	}
	return "unknown", "the API server's SelfSubjectReview named no user; the request is recorded as by \"unknown\""
}

// promotion is how a force-promote request ended, or not, within --wait.
type promotion struct {
	// done: status.lastForcePromotion records a new promotion of the node,
	// which is the writer.
	done bool
	// ignored is the controller's RequestIgnored event, when it cleared the
	// request.
	ignored *corev1.Event
	// cleared: the annotation is gone without either (someone removed it).
	cleared bool
	// vp is the VolumePair as last read.
	vp *storagev1alpha1.VolumePair
}

// forcePromotionOutcome reads one observation: vp as it is, and the events
// about it not seen before the request.
func forcePromotionOutcome(vp *storagev1alpha1.VolumePair, node string, before *storagev1alpha1.ForcePromotion, newEvents []corev1.Event) promotion {
	p := promotion{vp: vp}
	if f := vp.Status.LastForcePromotion; f != nil && f.Node == node && vp.Status.ActivePrimary == node &&
		(before == nil || f.Epoch != before.Epoch || !f.Time.Equal(&before.Time) || f.Node != before.Node) {
		p.done = true
		return p
	}
	if vp.Annotations[storagev1alpha1.AnnotationForcePromote] == node {
		return p
	}
	p.cleared = true
	for i := len(newEvents) - 1; i >= 0; i-- {
		e := newEvents[i]
		if e.Reason == reasonRequestIgnored && strings.Contains(e.Message, "force-promote") {
			p.ignored = &e
			break
		}
	}
	return p
}

// waitForcePromotion polls vp until the controller promoted node, cleared
// the request, or wait passed. seen are the events (uid/name → count) that
// were there before the request; withEvents is false when they could not
// be listed (then an ignored request shows only as a cleared annotation).
func (o *rootOptions) waitForcePromotion(ctx context.Context, c client.Client, vp *storagev1alpha1.VolumePair, node string,
	before *storagev1alpha1.ForcePromotion, seen map[string]int32, withEvents bool, wait time.Duration) (promotion, error) {
	poll := o.pollInterval
	if poll <= 0 {
		poll = defaultPollInterval
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	last := promotion{vp: vp}
	// A cleared request without its event yet: the event is recorded right
	// after the annotation is removed, so give it a few more polls.
	graceLeft := 5
	for {
		cur := &storagev1alpha1.VolumePair{}
		err := c.Get(ctx, client.ObjectKeyFromObject(vp), cur)
		switch {
		case err == nil:
			var fresh []corev1.Event
			if withEvents {
				if events, err := pairEvents(ctx, c, cur); err == nil {
					for _, e := range events {
						if n, ok := seen[string(e.UID)+"/"+e.Name]; !ok || eventCount(e) != n {
							fresh = append(fresh, e)
						}
					}
				}
			}
			last = forcePromotionOutcome(cur, node, before, fresh)
			if last.done || last.ignored != nil {
				return last, nil
			}
			if last.cleared {
				if graceLeft--; graceLeft <= 0 || !withEvents {
					return last, nil
				}
			}
		case ctx.Err() == nil:
			return last, explainAPIError(fmt.Sprintf("read volumepair %s/%s", vp.Namespace, vp.Name), err)
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return last, nil
			}
			return last, ctx.Err()
		case <-time.After(poll):
		}
	}
}

// report prints how the request ended; its error carries the exit status.
func (p promotion) report(w io.Writer, asked *storagev1alpha1.VolumePair, node string) error {
	ew := &errWriter{w: w}
	vp := p.vp
	ns, name := asked.Namespace, asked.Name
	switch {
	case p.done:
		f := vp.Status.LastForcePromotion
		ew.printf("\nPromoted: %s is the writer at epoch %d, by force, in place of %s", node, f.Epoch, orDash(f.From))
		if f.RequestedBy != "" {
			ew.printf(" (requested by %s)", f.RequestedBy)
		}
		if f.BlockedBy != "" {
			ew.printf("; it overrode %s", f.BlockedBy)
		} else {
			ew.printf("; nothing blocked it: it would have been promoted anyway")
		}
		ew.printf(".\nNow:  %s\n", stateSummary(vp))
		switch {
		case f.From != "" && slices.Contains(heldMembers(vp), f.From):
			ew.printf("Next: %s is held out of resync: when it returns it stays fenced with its data as it came back (kubectl tandem verify %s -n %s lists the regions where it differs; its files are under the agent's data directory on %s, volumes/%s/%s). "+
				"kubectl tandem release %s %s -n %s resyncs it from %s, which overwrites what it wrote that %s lacks.\n", f.From, name, ns, f.From, ns, name, name, f.From, ns, node, node)
		case f.From != "":
			ew.printf("Next: when %s returns it is resynced from %s, which overwrites what it wrote that %s lacks; to keep it out of resync and look at it first: kubectl tandem hold %s %s -n %s\n",
				f.From, node, node, name, f.From, ns)
		}
		ew.printf("Follow it with: kubectl tandem status %s -n %s\n", name, ns)
		return ew.done()
	case p.ignored != nil:
		ew.printf("\nNot promoted: the controller ignored the request and cleared it (event %s): %s\n", p.ignored.Reason, oneLine(p.ignored.Message))
		ew.printf("Now:  %s\n", stateSummary(vp))
		if err := ew.done(); err != nil {
			return err
		}
		return fmt.Errorf("the force-promote of %s in volumepair %s/%s was ignored: %s", node, ns, name, oneLine(p.ignored.Message))
	case p.cleared:
		ew.printf("\nNot promoted: the annotation %s no longer names %s, and the controller recorded no promotion of it", storagev1alpha1.AnnotationForcePromote, node)
		if v := vp.Annotations[storagev1alpha1.AnnotationForcePromote]; v != "" {
			ew.printf(" (it names %s now)", v)
		}
		ew.printf(".\nNow:  %s\nThe events (kubectl tandem status %s -n %s) say who cleared it.\n", stateSummary(vp), name, ns)
		if err := ew.done(); err != nil {
			return err
		}
		return fmt.Errorf("the force-promote of %s in volumepair %s/%s was withdrawn before the controller acted on it", node, ns, name)
	}
	ew.printf("\nStill waiting: the controller has not promoted %s yet.\n", node)
	ew.printf("Now:  %s\n", stateSummary(vp))
	if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionFailoverBlocked); c != nil && c.Status == metav1.ConditionTrue {
		ew.printf("FailoverBlocked: %s: %s\n", orDash(c.Reason), orDash(oneLine(c.Message)))
	}
	if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionReady); c != nil {
		ew.printf("Ready: %s, %s: %s\n", c.Status, orDash(c.Reason), orDash(oneLine(c.Message)))
	}
	ew.printf("The request stays set: the controller promotes %s as soon as it can (the lost writer's authority must expire first), "+
		"or clears it if it could not act for %v. "+
		"To withdraw it: kubectl annotate volumepair %s -n %s %s- %s-\n", node, storagev1alpha1.ForcePromoteTTL, name, ns, storagev1alpha1.AnnotationForcePromote, storagev1alpha1.AnnotationForcePromoteBy)
	ew.printf("Follow it with: kubectl tandem status %s -n %s\n", name, ns)
	if err := ew.done(); err != nil {
		return err
	}
	return &exitError{code: exitPending}
}

// done is the first write error, wrapped.
func (e *errWriter) done() error {
	if e.err != nil {
		return fmt.Errorf("write output: %w", e.err)
	}
	return nil
}
