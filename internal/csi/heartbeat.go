package csi

import (
	"context"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// The node plugin's heartbeat: a Lease tandem-csi-node-<node> in the
// driver's namespace, renewed every NodeHeartbeatEvery. The workload
// failover moves Pods off a node only when both its agent and its node
// plugin are gone: an agent that restarts (its node plugin still renews)
// is not a lost node.
const (
	NodeHeartbeatEvery    = 2 * time.Second
	NodeHeartbeatDuration = 6 * time.Second
	// componentNode labels the node plugin's Lease.
	componentNode = "csi-node"
)

// AnnotationAttachPath on the node plugin's Lease says how the node makes
// volumes block devices (kernel NBD or user space, and why).
const AnnotationAttachPath = "csi.tandem.dev/attach-path"

// NodeLeaseName is the node plugin's Lease on node.
func NodeLeaseName(node string) string { return v1.NodePluginLeaseName(node) }

// Heartbeat renews the node plugin's Lease until ctx is done, with the
// given annotations.
func Heartbeat(ctx context.Context, c client.Client, namespace, node string, annotations map[string]string, clk clock.WithTicker, log logr.Logger) {
	if clk == nil {
		clk = clock.RealClock{}
	}
	t := clk.NewTicker(NodeHeartbeatEvery)
	defer t.Stop()
	failing := false
	for {
		err := renewNodeLease(ctx, c, namespace, node, annotations, clk)
		switch {
		case err != nil && !failing:
			log.Error(err, "Cannot renew the node plugin's Lease")
			failing = true
		case err == nil && failing:
			log.Info("Node plugin Lease renewed again")
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
	}
}

func renewNodeLease(ctx context.Context, c client.Client, namespace, node string, annotations map[string]string, clk clock.Clock) error {
	ctx, cancel := context.WithTimeout(ctx, NodeHeartbeatDuration/2)
	defer cancel()
	now := metav1.NewMicroTime(clk.Now())
	l := &coordinationv1.Lease{}
	err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: NodeLeaseName(node)}, l)
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: NodeLeaseName(node),
				Labels: map[string]string{v1.LabelComponent: componentNode, v1.LabelNode: node}, Annotations: annotations},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node), LeaseDurationSeconds: ptr.To(int32(NodeHeartbeatDuration / time.Second)),
				AcquireTime: &now, RenewTime: &now},
		}
		if err := c.Create(ctx, l); err != nil {
			return fmt.Errorf("create node plugin Lease: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get node plugin Lease: %w", err)
	}
	l.Spec.RenewTime = &now
	l.Spec.HolderIdentity = ptr.To(node)
	for k, v := range annotations {
		if l.Annotations == nil {
			l.Annotations = map[string]string{}
		}
		l.Annotations[k] = v
	}
	l.Spec.LeaseDurationSeconds = ptr.To(int32(NodeHeartbeatDuration / time.Second))
	if err := c.Update(ctx, l); err != nil {
		return fmt.Errorf("renew node plugin Lease: %w", err)
	}
	return nil
}

// leaseCurrent says whether a Lease was renewed within its duration.
func leaseCurrent(l *coordinationv1.Lease, now time.Time) bool {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return false
	}
	return !now.After(l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second))
}
