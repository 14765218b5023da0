// Package agentapi is the contract between the controller and the per-node
// agent: the control API's endpoints, its request and answer bodies, its
// error body, the HTTP client the controller, kubectl-tandem, the tests and
// the benchmarks use, and the small interface (API) the controller depends
// on. Package agentapitest has an in-memory fake of it for unit tests.
//
// It imports nothing of the dataplane, so the controller and the plugin link
// neither the NBD server nor bitmaps nor stores: dataplane/agent serves this
// contract, and dataplane/volume reports its state in these types (it refers
// to them by type aliases).
//
// # Endpoints (HTTP/JSON)
//
// Every /v1 call needs "Authorization: Bearer <token>" (the token file given
// to the agent); a missing or wrong token gets 401. /healthz and /metrics are
// open, as probes and scrapers expect. An agent with mutual TLS (--tls-dir;
// package internal/tlsid) serves the same over HTTPS at an "https://"
// endpoint: /v1 then also needs a client certificate of its CA (403
// otherwise), and PUT, DELETE and POST need the manager's identity
// (spiffe://tandem.dev/manager); NewTLSAPI and TLSTransport make such
// clients.
//
//	GET    /healthz                                   200 "ok"
//	GET    /metrics                                   Prometheus metrics
//	GET    /v1/info                                   Info
//	GET    /v1/volumes                                []Status, every volume
//	PUT    /v1/volumes/{namespace}/{name}             body VolumeRequest: create if missing, apply the desired state; Status
//	GET    /v1/volumes/{namespace}/{name}             Status
//	DELETE /v1/volumes/{namespace}/{name}?purge=true  close (and with purge delete) the replica; 204 (without purge, 404 when there is none)
//	POST   /v1/volumes/{namespace}/{name}/peer-outdated  body PeerOutdatedRequest: the controller recorded the peer Outdated (sync mode may continue alone); Status
//	GET    /v1/volumes/{namespace}/{name}/bitmap      Bitmap: dirty regions as inclusive runs
//	POST   /v1/volumes/{namespace}/{name}/resync      body ResyncRequest: the writer copies these regions to its peer again (repair); Status
//	GET    /v1/volumes/{namespace}/{name}/checksums?first=F&count=N  Checksums of regions F..F+N-1 of the local replica (N ≤ MaxChecksumRegions), for online verify
//
// Errors are an ErrorBody with 400 (bad request), 401, 404 (no such replica
// on this node: IsNotFound), 409 (refused transition, e.g. promoting an
// Inconsistent member; a region size that differs from the existing
// replica's, or a smaller size: a volume never shrinks) or 500. A larger
// size grows the replica (see VolumeRequest); one the node's file system
// cannot hold, or past 2^26 of the replica's write-intent extents, is a
// 400. The client returns them as *APIError. A call that provably never
// reached the agent fails with an error wrapping ErrNotSent.
//
// # Roles, modes and data states: one definition
//
// Role, Mode and DataState are type aliases of the VolumePair API's
// MemberRole, ReplicationMode and DataState (package api/v1alpha1), and the
// constants here are that package's constants. The API owns them because
// they are what users see and what the CRD validates (its enum markers
// generate the schema), and the controller copies an agent's report into
// VolumePair status as it is: with aliases a value goes from the agent's
// answer to status.members[].role without a conversion, and a new value
// cannot exist on one side only. The other direction was not possible:
// api/v1alpha1 must not import client code. DataUnknown is the controller's
// own ("the member has not reported"); an agent never reports it. The
// on-disk metadata (dataplane/meta) keeps its own strings: a file format
// must not change when the API does.
//
// The cost of this direction is that whatever imports this package links
// api/v1alpha1 and the apimachinery types it uses (not client-go).
package agentapi
