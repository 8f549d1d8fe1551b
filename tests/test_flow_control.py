"""The worker's flow control keeps what the agents' queues hold when it resumes (Faust's own empties them
after a rebalance has already delivered messages past the seek, dropping them unprocessed), and still
empties them when told to, as on revocation and shutdown."""

from mode.utils.queues import FlowControlQueue

from crm_pulse.agents.faust_fixes import KeepQueuesOnResume


def test_resume_keeps_delivered_messages_and_clear_still_empties():
    flow = KeepQueuesOnResume()
    queue = FlowControlQueue(flow_control=flow, clear_on_resume=True)  # as Faust makes every agent's queue
    flow.resume()
    queue.put_nowait("offset 41")
    queue.put_nowait("offset 42")
    flow.resume()
    assert flow.is_active() and [queue.get_nowait(), queue.get_nowait()] == ["offset 41", "offset 42"]
    queue.put_nowait("offset 43")
    flow.suspend()
    flow.clear()
    assert not flow.is_active() and queue.empty()


def test_the_worker_app_uses_it(app):
    assert isinstance(app.flow_control, KeepQueuesOnResume)
