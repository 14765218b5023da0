package nbd

import (
	"errors"
	"fmt"
)

// acquire waits for room for one more request of cost payload bytes and
// makes sure a worker is free to take it.
func (c *conn) acquire(cost int64) {
	c.slotMu.Lock()
	for c.inFlight >= c.maxInFlight || (c.inBytes > 0 && c.inBytes+cost > c.maxBytes) {
		c.slotFree.Wait()
	}
	c.inFlight++
	c.inBytes += cost
	n := c.inFlight
	c.slotMu.Unlock()
	if c.workers < n {
		c.workers++
		c.wg.Go(c.worker)
	}
}

// errAdmitCancelled: the reader stopped waiting for the budget because the
// connection is going away.
var errAdmitCancelled = errors.New("stopped waiting for the in-flight budget")

// charge waits for r's payload bytes in the server's budget, after acquire.
// Only the connection going away (shutdown, failure) ends the wait; then r
// is released and the error ends the read loop.
func (c *conn) charge(r *request) error {
	if c.s.Budget == nil || r.cost == 0 {
		return nil
	}
	n, err := c.s.Budget.Acquire(c.admitCtx, r.cost)
	if err != nil {
		c.release(r)
		return fmt.Errorf("%w: %w", errAdmitCancelled, err)
	}
	r.charge = n
	return nil
}

// release gives back a request's slot and budget and recycles the request.
func (c *conn) release(r *request) {
	c.slotMu.Lock()
	c.inFlight--
	c.inBytes -= r.cost
	c.slotMu.Unlock()
	c.slotFree.Signal()
	c.s.Budget.Release(r.charge)
	if r.buf != nil {
		putBuf(r.buf)
	}
	*r = request{}
	requestPool.Put(r)
}
