// Package dataplane is the root of the per-node agent's code: the
// replica store, the NBD frontend, the replication link, the roaring dirty
// bitmaps with their write-intent log, and the control API the controller
// drives. Each concern lives in its own subpackage.
package dataplane
