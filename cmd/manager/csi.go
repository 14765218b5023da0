package main

import (
	"context"
	"fmt"
	"net"
	"time"

	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"

	"github.com/tandem-storage/tandem/internal/csi"
)

// setupCSI adds the CSI controller side to the manager: the provisioner,
// the attacher and the resizer (leader only) and, when asked, the CSI
// controller service on a socket. ctx is the process's: it must be called
// before the manager starts (see the provisioner below).
// Both read through an uncached client: CreateVolume must see the
// VolumePair an earlier call created, not the cache's view of a moment ago.
func setupCSI(ctx context.Context, mgr manager.Manager, namespace string, provision, podFailover bool, endpoint string) error {
	c, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return fmt.Errorf("CSI client: %w", err)
	}
	cc := &csi.Controller{Client: c, Namespace: namespace}
	log := ctrl.Log.WithName("csi")
	if provision {
		// Attaching (VolumeAttachments), resizing (claims asking for more)
		// and provisioning run on the leader.
		if err := (&csi.AttachController{Client: mgr.GetClient(), Controller: cc}).SetupWithManager(mgr); err != nil {
			return fmt.Errorf("CSI attacher: %w", err)
		}
		if err := (&csi.Resizer{Client: mgr.GetClient(), Controller: cc, Recorder: mgr.GetEventRecorder("tandem-csi-resizer")}).SetupWithManager(mgr); err != nil {
			return fmt.Errorf("CSI resizer: %w", err)
		}
		cs, err := kubernetes.NewForConfig(mgr.GetConfig())
		if err != nil {
			return fmt.Errorf("CSI provisioner client: %w", err)
		}
		// Made here, before the manager starts anything: the library adds
		// core/v1 to client-go's global scheme each time it builds a
		// controller, a map write that must not meet the reads of the
		// clients already running (leader election renews its Lease
		// through that scheme). ctx is the process's: the library's event
		// broadcaster lives as long as the manager.
		pc := controller.NewProvisionController(ctx, cs, csi.DriverName, &csi.Provisioner{Controller: cc, Attachments: mgr.GetClient()},
			controller.LeaderElection(false), controller.Threadiness(4),
			controller.FailedProvisionThreshold(0), controller.FailedDeleteThreshold(0),
			controller.RetryIntervalMax(time.Minute))
		// A Runnable without NeedLeaderElection runs on the leader only; the
		// library's own election is off.
		if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
			log.Info("Provisioning volumes", "provisioner", csi.DriverName)
			pc.Run(ctx)
			return nil
		})); err != nil {
			return err
		}
	}
	if podFailover {
		if err := (&csi.PodFailover{Client: mgr.GetClient(), Controller: cc, Recorder: mgr.GetEventRecorder("tandem-pod-failover")}).SetupWithManager(mgr); err != nil {
			return fmt.Errorf("CSI workload failover: %w", err)
		}
	}
	if endpoint != "" {
		ln, err := csi.Listen(endpoint)
		if err != nil {
			return err
		}
		if err := mgr.Add(csiServer{ln: ln, cc: cc}); err != nil {
			return err
		}
	}
	return nil
}

// csiServer serves the controller service on every manager (not only the
// leader): a sidecar next to each one calls its own.
type csiServer struct {
	ln net.Listener
	cc *csi.Controller
}

func (s csiServer) Start(ctx context.Context) error {
	return csi.Serve(ctx, s.ln, csi.Services{Identity: &csi.Identity{Controller: true}, Controller: s.cc}, ctrl.Log.WithName("csi"))
}

func (csiServer) NeedLeaderElection() bool { return false }
