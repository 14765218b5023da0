package controllers

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Condition reasons.
const (
	ReasonServing           = "Serving"
	ReasonNoWriter          = "NoWriter"
	ReasonWriterUnreachable = "WriterUnreachable"
	ReasonInSync            = "InSync"
	ReasonCopying           = "CopyInProgress"
	ReasonPeerDisconnected  = "PeerDisconnected"
	ReasonOutOfSync         = "OutOfSync"
	ReasonBothHealthy       = "BothMembersHealthy"
	ReasonPeerLost          = "PeerLost"
	ReasonPeerNotUpToDate   = "PeerNotUpToDate"
	ReasonUnmergedRegions   = "UnmergedRegions"
	// ReasonRequestIgnored is the event of a request annotation cleared
	// because it asks for nothing possible (StaleRequest).
	ReasonRequestIgnored = "RequestIgnored"
	// ReasonResyncHeld: a member is held out of resync.
	ReasonResyncHeld = "ResyncHeld"
	// ReasonMemberNotFound: a member's node no longer exists.
	ReasonMemberNotFound = PendingMemberNotFound
)

func set(conds *[]metav1.Condition, gen int64, typ string, ok bool, reason, msg string) {
	st := metav1.ConditionFalse
	if ok {
		st = metav1.ConditionTrue
	}
	meta.SetStatusCondition(conds, metav1.Condition{Type: typ, Status: st, Reason: reason, Message: msg, ObservedGeneration: gen})
}

// setReadyCondition: True when the writer serves the volume.
func setReadyCondition(conds *[]metav1.Condition, gen int64, writer *MemberView) {
	switch {
	case writer == nil:
		set(conds, gen, v1.ConditionReady, false, ReasonNoWriter, "no member holds the writer's authority yet")
	case !writer.Reachable:
		set(conds, gen, v1.ConditionReady, false, ReasonWriterUnreachable, fmt.Sprintf("the agent on %s does not answer", writer.Node))
	case writer.Status == nil || !writer.Status.Writable:
		reason := "not configured yet"
		if writer.Status != nil && writer.Status.Reason != "" {
			reason = writer.Status.Reason
		}
		set(conds, gen, v1.ConditionReady, false, ReasonNoWriter, fmt.Sprintf("%s does not accept writes: %s", writer.Node, reason))
	default:
		set(conds, gen, v1.ConditionReady, true, ReasonServing, fmt.Sprintf("%s serves the volume", writer.Node))
	}
}

// setSynchronizedCondition: True when every member holds the writer's
// data.
func setSynchronizedCondition(conds *[]metav1.Condition, gen int64, writer *MemberView, others []*MemberView) {
	w := writer.Status
	all := "both members hold the same data"
	if len(others) > 1 {
		all = fmt.Sprintf("all %d members hold the same data", len(others)+1)
	}
	for _, other := range others {
		p := LinkTo(writer, other)
		switch {
		case w == nil || !p.Connected:
			set(conds, gen, v1.ConditionSynchronized, false, ReasonPeerDisconnected, fmt.Sprintf("%s is not connected to %s", writer.Node, other.Node))
			return
		case p.Copy.Running:
			msg := fmt.Sprintf("copying %d of %d bytes to %s", p.Copy.TotalBytes-p.Copy.DoneBytes, p.Copy.TotalBytes, other.Node)
			if p.Copy.FullCopy {
				msg += " (full copy: " + p.Copy.Reason + ")"
			}
			set(conds, gen, v1.ConditionSynchronized, false, ReasonCopying, truncate(msg, 32768))
			return
		case p.OutOfSyncRegions > 0 || other.Status == nil || other.Status.DataState != agentapi.UpToDate:
			set(conds, gen, v1.ConditionSynchronized, false, ReasonOutOfSync, fmt.Sprintf("%d bytes not yet on %s", p.OutOfSyncBytes, other.Node))
			return
		}
	}
	if n := unmerged(append([]*MemberView{writer}, others...)...); n > 0 {
		holder := writer.Node
		for _, o := range others {
			if o.Status.UnmergedRegions > 0 {
				holder = o.Node
			}
		}
		set(conds, gen, v1.ConditionSynchronized, false, ReasonUnmergedRegions, fmt.Sprintf(
			"%d regions may differ between the members: %s holds there writes it acknowledged alone that were never copied to its peer "+
				"(spec.resync.mergePrimaryBitmap is false); everything else is in sync. kubectl tandem verify lists the regions that differ; "+
				"kubectl tandem verify --repair copies the writer's data over them",
			n, holder))
		return
	}
	set(conds, gen, v1.ConditionSynchronized, true, ReasonInSync, all)
}

// unmerged is how many regions the members report as unmerged.
func unmerged(members ...*MemberView) int64 {
	var n int64
	for _, m := range members {
		if m.Status != nil {
			n += int64(m.Status.UnmergedRegions)
		}
	}
	return n
}

// setDegradedCondition: True when some member does not hold current data
// (a pair of two: only one member does).
func setDegradedCondition(conds *[]metav1.Condition, gen int64, writer *MemberView, others []*MemberView) {
	if writer.Status == nil {
		set(conds, gen, v1.ConditionDegraded, true, ReasonWriterUnreachable, fmt.Sprintf("no report from the writer %s", writer.Node))
		return
	}
	for _, other := range others {
		switch {
		case !LinkTo(writer, other).Connected && other.Held:
			set(conds, gen, v1.ConditionDegraded, true, ReasonResyncHeld, fmt.Sprintf("%s runs without %s, which is held out of resync (%s): "+
				"its data stays as it came back; remove it from the annotation to resync it (what it wrote since it left is overwritten)", writer.Node, other.Node, v1.AnnotationHoldResync))
			return
		case !LinkTo(writer, other).Connected && other.NodeMissing:
			set(conds, gen, v1.ConditionDegraded, true, ReasonMemberNotFound, fmt.Sprintf("%s runs without %s, whose node no longer exists (no Node object); "+
				"changed regions are tracked for its return. If it is gone for good, replace it: set %s to another node (it receives a full copy)", writer.Node, other.Node, other.Field))
			return
		case !LinkTo(writer, other).Connected:
			set(conds, gen, v1.ConditionDegraded, true, ReasonPeerLost, fmt.Sprintf("%s runs without %s; changed regions are tracked for resync", writer.Node, other.Node))
			return
		case other.Status == nil || other.Status.DataState != agentapi.UpToDate:
			msg := fmt.Sprintf("%s is being resynced", other.Node)
			if other.Status != nil && other.Status.DataStateReason != "" {
				msg = fmt.Sprintf("%s is being resynced: %s", other.Node, other.Status.DataStateReason)
			}
			set(conds, gen, v1.ConditionDegraded, true, ReasonPeerNotUpToDate, truncate(msg, 32768))
			return
		}
	}
	msg := "both members are connected and up to date"
	if len(others) > 1 {
		msg = fmt.Sprintf("all %d members are connected and up to date", len(others)+1)
	}
	set(conds, gen, v1.ConditionDegraded, false, ReasonBothHealthy, msg)
}

// setFailoverBlockedCondition: True when a lost writer is not replaced.
func setFailoverBlockedCondition(conds *[]metav1.Condition, gen int64, step Step) {
	if step.Blocked == "" || step.Blocked == BlockedNone {
		set(conds, gen, v1.ConditionFailoverBlocked, false, BlockedNone, "no failover is needed or it is not blocked")
		return
	}
	set(conds, gen, v1.ConditionFailoverBlocked, true, step.Blocked, step.Message)
}

// truncate shortens s to at most n bytes (on a rune boundary), marking the
// cut, so a long agent message fits a status field's bound.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// Reasons of the Expanding condition (online expansion). While an agent
// refuses to grow, the reason is ReasonExpansionRefused, as its event's.
const (
	// ReasonExpanding: spec.size grew and members are being grown (the
	// backups first, then the writer), or a member that does not answer
	// grows when it returns.
	ReasonExpanding = "Expanding"
	// ReasonNotExpanding: every member serves spec.size.
	ReasonNotExpanding = "NotExpanding"
)

// expansion is how far an online expansion got: what each member serves
// against spec.size.
type expansion struct {
	from, to int64 // what the writer serves (the smallest size known when it has not reported), spec.size
	// grown and next are the backups that answer and serve spec.size, or
	// do not yet; away the members that do not answer and last reported
	// less (or nothing, after the controller restarted).
	grown, next, away []string
	// writerSmall: the writer answers and serves less than spec.size.
	writerSmall bool
	// refused is the first member (backups first) whose agent refused to
	// grow, and its answer.
	refused, refusedMsg string
	writer              string
}

// active reports whether some member serves less than spec.size.
func (e expansion) active() bool { return e.writerSmall || len(e.next) > 0 || len(e.away) > 0 }

// expansionOf sizes up the members: a member that answers by its report,
// one that does not by lastSize (its last report; 0: none).
func expansionOf(v *View, writer *MemberView, others []*MemberView, lastSize func(node string) int64) expansion {
	e := expansion{to: v.Size, writer: writer.Node}
	size := func(m *MemberView) int64 {
		if m.Status != nil && m.Status.Size > 0 {
			return m.Status.Size
		}
		return lastSize(m.Node)
	}
	e.from = size(writer)
	for _, o := range others {
		n := size(o)
		switch {
		case !o.Reachable && n > 0 && n < v.Size:
			e.away = append(e.away, o.Node)
		case v.Smaller(o):
			e.next = append(e.next, o.Node)
			if o.GrowRefused != "" && e.refused == "" {
				e.refused, e.refusedMsg = o.Node, o.GrowRefused
			}
		case o.Reachable && n >= v.Size:
			e.grown = append(e.grown, o.Node)
		}
	}
	if e.from == 0 {
		for _, o := range others {
			if n := size(o); n > 0 && (e.from == 0 || n < e.from) {
				e.from = n
			}
		}
	}
	e.writerSmall = v.Smaller(writer)
	if e.writerSmall && writer.GrowRefused != "" && e.refused == "" {
		e.refused, e.refusedMsg = writer.Node, writer.GrowRefused
	}
	return e
}

// awayMsg says that members that do not answer grow when they return.
func (e expansion) awayMsg() string {
	if len(e.away) == 0 {
		return ""
	}
	return fmt.Sprintf("%s does not answer and grows to %s when it returns, before its resync", strings.Join(e.away, ", "), human(e.to))
}

// setExpandingCondition: True while spec.size is larger than what a member
// serves, saying which members grew and which are next (the backups
// first, then the writer), or which agent refused and why.
func setExpandingCondition(conds *[]metav1.Condition, gen int64, e expansion) {
	if !e.active() {
		set(conds, gen, v1.ConditionExpanding, false, ReasonNotExpanding, fmt.Sprintf("every member serves %s (spec.size)", human(e.to)))
		return
	}
	head := fmt.Sprintf("growing from %s to %s: ", human(e.from), human(e.to))
	if e.from == 0 {
		head = fmt.Sprintf("growing to %s: ", human(e.to))
	}
	if e.refused != "" {
		var msg string
		if e.refused == e.writer {
			msg = fmt.Sprintf("the backups serve %s, but the agent on the writer %s refused to grow: %s; the volume stays %s", human(e.to), e.writer, e.refusedMsg, human(e.from))
		} else {
			msg = fmt.Sprintf("the agent on %s refused to grow: %s; the writer %s serves %s until every backup that answers has grown", e.refused, e.refusedMsg, e.writer, human(e.from))
		}
		msg += fmt.Sprintf(" (asked again within %v, or when spec.size changes)", growRetry)
		set(conds, gen, v1.ConditionExpanding, true, ReasonExpansionRefused, truncate(head+msg, 32768))
		return
	}
	var parts []string
	if len(e.grown) > 0 {
		parts = append(parts, strings.Join(e.grown, ", ")+" done")
	}
	if len(e.next) > 0 {
		parts = append(parts, strings.Join(e.next, ", ")+" next")
	}
	var msg string
	switch {
	case e.writerSmall || len(e.next) > 0:
		msg = "backups first"
		if len(parts) > 0 {
			msg += " (" + strings.Join(parts, "; ") + ")"
		}
		msg += ", then the writer " + e.writer
		if e.writerSmall && len(e.next) == 0 {
			msg += " (next)"
		}
		if a := e.awayMsg(); a != "" {
			msg += "; " + a
		}
	default:
		head = fmt.Sprintf("grown to %s: ", human(e.to))
		msg = fmt.Sprintf("the writer %s serves it, as every member that answers does; %s", e.writer, e.awayMsg())
	}
	set(conds, gen, v1.ConditionExpanding, true, ReasonExpanding, truncate(head+msg, 32768))
}
