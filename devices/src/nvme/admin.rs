//! Admin commands, run on the controller thread.

use std::sync::atomic::Ordering;

use super::ctrl::{
    CCTEMP, Control, CqInfo, CtrlThread, DoorbellMode, ERROR_LOG_ENTRIES, Event, Features,
    OWNER_NONE, SqInfo, TEMPERATURE, WCTEMP,
};
use super::dptr;
use super::guest::Guest;
use super::io::{NSID, NSID_ALL};
use super::queue::{Cq, Sq};
use super::spec::{
    CQES_LOG2, Command, PSDT_PRP, SQES_LOG2, Status, admin, aer, cc, feat, io, log_page,
};

/// Outstanding Asynchronous Event Requests allowed, 0-based (AERL).
const AERL: u8 = 3;
/// Abort command limit, 0-based (ACL).
const ACL: u8 = 3;
/// Keep alive granularity, 100 ms units (KAS): 1 s.
const KAS: u16 = 10;

type Res = Result<u32, Status>;

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

fn put_str(b: &mut [u8], at: usize, len: usize, s: &str) {
    let mut f = vec![b' '; len];
    for (d, c) in f.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    put(b, at, &f);
}

/// A 64-bit FNV-1a hash, to derive stable identifiers from the serial.
fn fnv(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl CtrlThread {
    /// Run an admin command. `None`: the command completes later (AER).
    pub(crate) fn admin(&mut self, g: &mut Guest<'_>, cmd: &Command) -> Option<(Status, u32)> {
        if cmd.fuse != 0 || cmd.psdt != PSDT_PRP {
            return Some((Status::INVALID_FIELD, 0));
        }
        let r = match cmd.opcode {
            admin::IDENTIFY => self.identify(g, cmd),
            admin::CREATE_CQ => self.create_cq(cmd),
            admin::CREATE_SQ => self.create_sq(cmd),
            admin::DELETE_SQ => self.delete_sq(cmd),
            admin::DELETE_CQ => self.delete_cq(cmd),
            admin::GET_FEATURES => self.get_features(cmd),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_LOG_PAGE => self.get_log_page(g, cmd),
            admin::ASYNC_EVENT => {
                if self.aers.len() > usize::from(AERL) {
                    Err(Status::AER_LIMIT_EXCEEDED)
                } else {
                    self.aers.push(cmd.cid);
                    return None;
                }
            }
            // Commands complete in order as they are fetched: there is never
            // one to abort. DW0 bit 0 set: not aborted.
            admin::ABORT => Ok(1),
            admin::KEEP_ALIVE => {
                self.last_keep_alive = std::time::Instant::now();
                Ok(0)
            }
            admin::DBBUF_CONFIG if self.sh.cfg.doorbells == DoorbellMode::Trap => {
                self.dbbuf_config(cmd)
            }
            _ => Err(Status::INVALID_OPCODE),
        };
        Some(match r {
            Ok(dw0) => (Status::SUCCESS, dw0),
            Err(s) => (s, 0),
        })
    }

    /// Copy `data` to the host buffer of `cmd` (PRPs).
    fn copy_to_host(
        &mut self,
        g: &mut Guest<'_>,
        cmd: &Command,
        data: &[u8],
    ) -> Result<(), Status> {
        let page = self.page();
        dptr::segments(
            g,
            cmd,
            data.len() as u64,
            page,
            true,
            false,
            &mut self.scratch.segs,
        )?;
        let mut at = 0usize;
        for s in &self.scratch.segs {
            let l = s.len as usize;
            g.write(s.iova, &data[at..at + l])
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            at += l;
        }
        Ok(())
    }

    fn identify(&mut self, g: &mut Guest<'_>, cmd: &Command) -> Res {
        let cns = cmd.cdw10 & 0xff;
        let data = match cns {
            0x00 => {
                if cmd.nsid != NSID {
                    return Err(Status::INVALID_NAMESPACE);
                }
                self.identify_ns()
            }
            0x01 => self.identify_ctrl(),
            0x02 => {
                if cmd.nsid >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let mut d = [0u8; 4096];
                if cmd.nsid < NSID {
                    put(&mut d, 0, &NSID.to_le_bytes());
                }
                d
            }
            0x03 => {
                if cmd.nsid != NSID {
                    return Err(Status::INVALID_NAMESPACE);
                }
                self.ns_descriptors()
            }
            _ => return Err(Status::INVALID_FIELD),
        };
        self.copy_to_host(g, cmd, &data)?;
        Ok(0)
    }

    fn nguid(&self) -> [u8; 16] {
        let s = self.sh.cfg.serial.as_bytes();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&fnv(s, 1).to_be_bytes());
        id[8..].copy_from_slice(&fnv(s, 2).to_be_bytes());
        id
    }

    fn ns_uuid(&self) -> [u8; 16] {
        let s = self.sh.cfg.serial.as_bytes();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&fnv(s, 3).to_be_bytes());
        id[8..].copy_from_slice(&fnv(s, 4).to_be_bytes());
        // RFC 4122 version 4 layout (random-looking, derived)
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        id
    }

    fn eui64(&self) -> [u8; 8] {
        fnv(self.sh.cfg.serial.as_bytes(), 5).to_be_bytes()
    }

    pub(crate) fn identify_ctrl(&self) -> [u8; 4096] {
        let cfg = &self.sh.cfg;
        let mut d = [0u8; 4096];
        put(&mut d, 0, &cfg.vendor_id.to_le_bytes());
        put(&mut d, 2, &cfg.subsystem_vendor_id.to_le_bytes());
        put_str(&mut d, 4, 20, &cfg.serial);
        put_str(&mut d, 24, 40, &cfg.model);
        put_str(&mut d, 64, 8, &cfg.firmware);
        d[72] = 6; // RAB
        d[77] = cfg.mdts;
        put(&mut d, 78, &1u16.to_le_bytes()); // CNTLID
        put(&mut d, 80, &0x0001_0400u32.to_le_bytes()); // VER 1.4
        put(&mut d, 92, &(1u32 << 8).to_le_bytes()); // OAES: namespace attribute notices
        d[111] = 1; // CNTRLTYPE: I/O controller
        let oacs: u16 = if cfg.doorbells == DoorbellMode::Trap {
            1 << 8 // Doorbell Buffer Config
        } else {
            0
        };
        put(&mut d, 256, &oacs.to_le_bytes());
        d[258] = ACL;
        d[259] = AERL;
        d[260] = (1 << 1) | 1; // FRMW: one slot, read-only
        d[261] = (1 << 1) | (1 << 2); // LPA: effects log, extended data
        d[262] = (ERROR_LOG_ENTRIES - 1) as u8; // ELPE
        d[263] = 0; // NPSS: one power state
        put(&mut d, 266, &WCTEMP.to_le_bytes());
        put(&mut d, 268, &CCTEMP.to_le_bytes());
        put(&mut d, 320, &KAS.to_le_bytes());
        d[512] = ((SQES_LOG2 << 4) | SQES_LOG2) as u8; // SQES
        d[513] = ((CQES_LOG2 << 4) | CQES_LOG2) as u8; // CQES
        put(&mut d, 516, &1u32.to_le_bytes()); // NN
        // ONCS: DSM, Write Zeroes, Save/Select in features
        put(
            &mut d,
            520,
            &((1u16 << 2) | (1 << 3) | (1 << 4)).to_le_bytes(),
        );
        d[525] = 1 | (3 << 1); // VWC present; flush to all namespaces supported
        d[530] = 1; // NVSCC
        // SGLS: supported (no alignment requirement), bit bucket
        put(&mut d, 536, &(1u32 | (1 << 16)).to_le_bytes());
        let nqn = format!(
            "nqn.2024-01.dev.vdevd:nvme:{}",
            cfg.serial.trim().replace(' ', "_")
        );
        put(&mut d, 768, &nqn.as_bytes()[..nqn.len().min(255)]);
        // Power state 0: 25 W, operational
        put(&mut d, 2048, &2500u16.to_le_bytes());
        d
    }

    pub(crate) fn identify_ns(&self) -> [u8; 4096] {
        let ns = self.sh.ns;
        let mut d = [0u8; 4096];
        put(&mut d, 0, &ns.blocks.to_le_bytes()); // NSZE
        put(&mut d, 8, &ns.blocks.to_le_bytes()); // NCAP
        put(&mut d, 16, &ns.blocks.to_le_bytes()); // NUSE
        d[25] = 0; // NLBAF: one format
        d[26] = 0; // FLBAS: format 0, no metadata
        // DLFEAT: deallocated blocks read as zeroes; Write Zeroes DEAC
        d[33] = 1 | (1 << 3);
        put(&mut d, 104, &self.nguid());
        put(&mut d, 120, &self.eui64());
        // LBA format 0: no metadata, 2^lba_shift bytes, best performance
        put(&mut d, 128, &(ns.lba_shift << 16).to_le_bytes());
        d
    }

    fn ns_descriptors(&self) -> [u8; 4096] {
        let mut d = [0u8; 4096];
        let mut at = 0;
        for (kind, id) in [
            (1u8, &self.eui64()[..]),
            (2, &self.nguid()[..]),
            (3, &self.ns_uuid()[..]),
        ] {
            d[at] = kind;
            d[at + 1] = id.len() as u8;
            put(&mut d, at + 4, id);
            at += 4 + id.len();
        }
        d
    }

    fn queue_size(&self, cdw10: u32) -> Result<u32, Status> {
        let size = (cdw10 >> 16) + 1;
        if size < 2 || size > self.sh.cfg.max_queue_entries {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        Ok(size)
    }

    fn queue_base(&self, prp1: u64) -> Result<u64, Status> {
        if prp1 == 0 || prp1 & (self.page() - 1) != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        Ok(prp1)
    }

    fn create_cq(&mut self, cmd: &Command) -> Res {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        let pc = cmd.cdw11 & 1 != 0;
        let ien = cmd.cdw11 & 2 != 0;
        let iv = (cmd.cdw11 >> 16) as u16;
        if qid == 0
            || qid > self.feat.queues.1
            || self.cqs.get(usize::from(qid)).is_none_or(Option::is_some)
        {
            return Err(Status::INVALID_QID);
        }
        let size = self.queue_size(cmd.cdw10)?;
        if !pc {
            return Err(Status::INVALID_FIELD);
        }
        if iv >= self.sh.cfg.msix_vectors() {
            return Err(Status::INVALID_VECTOR);
        }
        if cc::iocqes(self.sh.cc.load(Ordering::Acquire)) != CQES_LOG2 {
            return Err(Status::INVALID_FIELD);
        }
        let base = self.queue_base(cmd.dptr1)?;
        let workers = self.sh.ctl.len().max(1);
        let worker = (usize::from(qid) - 1) % workers;
        self.sh.db.set(2 * usize::from(qid) + 1, 0);
        if let Some(ctl) = self.sh.ctl.get(worker) {
            ctl.submit(
                &self.sh,
                worker,
                Control::CreateCq(Cq::new(qid, base, size, iv, ien)),
            );
        }
        if let Some(slot) = self.cqs.get_mut(usize::from(qid)) {
            *slot = Some(CqInfo { worker, sqs: 0 });
        }
        self.sh.set_owner(false, qid, worker as u16 + 1);
        self.io_queues_created = true;
        Ok(0)
    }

    fn create_sq(&mut self, cmd: &Command) -> Res {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        let pc = cmd.cdw11 & 1 != 0;
        let cqid = (cmd.cdw11 >> 16) as u16;
        if qid == 0
            || qid > self.feat.queues.0
            || self.sqs.get(usize::from(qid)).is_none_or(Option::is_some)
        {
            return Err(Status::INVALID_QID);
        }
        let Some(Some(cq)) = self.cqs.get(usize::from(cqid)).copied() else {
            return Err(Status::CQ_INVALID);
        };
        if cqid == 0 {
            return Err(Status::CQ_INVALID);
        }
        let size = self.queue_size(cmd.cdw10)?;
        if !pc {
            return Err(Status::INVALID_FIELD);
        }
        if cc::iosqes(self.sh.cc.load(Ordering::Acquire)) != SQES_LOG2 {
            return Err(Status::INVALID_FIELD);
        }
        let base = self.queue_base(cmd.dptr1)?;
        self.sh.db.set(2 * usize::from(qid), 0);
        if let Some(ctl) = self.sh.ctl.get(cq.worker) {
            ctl.submit(
                &self.sh,
                cq.worker,
                Control::CreateSq(Sq::new(qid, base, size, cqid)),
            );
        }
        if let Some(Some(c)) = self.cqs.get_mut(usize::from(cqid)) {
            c.sqs += 1;
        }
        if let Some(slot) = self.sqs.get_mut(usize::from(qid)) {
            *slot = Some(SqInfo { cqid });
        }
        self.sh.set_owner(true, qid, cq.worker as u16 + 1);
        self.io_queues_created = true;
        Ok(0)
    }

    fn delete_sq(&mut self, cmd: &Command) -> Res {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        let Some(Some(info)) = self.sqs.get(usize::from(qid)).copied() else {
            return Err(Status::INVALID_QID);
        };
        if qid == 0 {
            return Err(Status::INVALID_QID);
        }
        let worker = self
            .cqs
            .get(usize::from(info.cqid))
            .copied()
            .flatten()
            .map_or(0, |c| c.worker);
        self.sh.set_owner(true, qid, OWNER_NONE);
        if let Some(ctl) = self.sh.ctl.get(worker) {
            ctl.submit(&self.sh, worker, Control::DeleteSq(qid));
        }
        if let Some(Some(c)) = self.cqs.get_mut(usize::from(info.cqid)) {
            c.sqs = c.sqs.saturating_sub(1);
        }
        if let Some(slot) = self.sqs.get_mut(usize::from(qid)) {
            *slot = None;
        }
        self.sh.db.set(2 * usize::from(qid), 0);
        Ok(0)
    }

    fn delete_cq(&mut self, cmd: &Command) -> Res {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        let Some(Some(info)) = self.cqs.get(usize::from(qid)).copied() else {
            return Err(Status::INVALID_QID);
        };
        if qid == 0 {
            return Err(Status::INVALID_QID);
        }
        if info.sqs > 0 {
            return Err(Status::INVALID_QUEUE_DELETION);
        }
        self.sh.set_owner(false, qid, OWNER_NONE);
        if let Some(ctl) = self.sh.ctl.get(info.worker) {
            ctl.submit(&self.sh, info.worker, Control::DeleteCq(qid));
        }
        if let Some(slot) = self.cqs.get_mut(usize::from(qid)) {
            *slot = None;
        }
        self.sh.db.set(2 * usize::from(qid) + 1, 0);
        Ok(0)
    }

    fn feature_value(&self, f: &Features, fid: u8, cmd: &Command) -> Res {
        Ok(match fid {
            feat::ARBITRATION => f.arbitration,
            feat::POWER_MGMT => f.power_state,
            feat::TEMP_THRESH => {
                let tmpsel = (cmd.cdw11 >> 16) & 0xf;
                let thsel = (cmd.cdw11 >> 20) & 3;
                if tmpsel != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                match thsel {
                    0 => u32::from(f.temp_over),
                    1 => u32::from(f.temp_under),
                    _ => return Err(Status::INVALID_FIELD),
                }
            }
            feat::ERROR_RECOVERY => f.error_recovery,
            feat::VOLATILE_WC => u32::from(self.sh.backend.write_cache()),
            feat::NUM_QUEUES => (u32::from(f.queues.1 - 1) << 16) | u32::from(f.queues.0 - 1),
            feat::IRQ_COALESCE => f.irq_coalesce,
            feat::IRQ_CONFIG => {
                let iv = cmd.cdw11 & 0xffff;
                let cd = f.irq_cd.get(iv as usize).ok_or(Status::INVALID_FIELD)?;
                iv | (u32::from(*cd) << 16)
            }
            feat::WRITE_ATOMICITY => f.write_atomicity,
            feat::ASYNC_EVENT => f.aec,
            feat::KATO => f.kato,
            _ => return Err(Status::INVALID_FIELD),
        })
    }

    fn get_features(&mut self, cmd: &Command) -> Res {
        let fid = (cmd.cdw10 & 0xff) as u8;
        let sel = (cmd.cdw10 >> 8) & 7;
        match sel {
            0 => {
                let f = self.feat.clone();
                self.feature_value(&f, fid, cmd)
            }
            // Nothing is saved: the saved value is the default.
            1 | 2 => {
                let f = Features::defaults(&self.sh.cfg);
                let v = self.feature_value(&f, fid, cmd)?;
                // The write cache is on by default.
                Ok(if fid == feat::VOLATILE_WC { 1 } else { v })
            }
            3 => {
                let f = self.feat.clone();
                self.feature_value(&f, fid, cmd)?;
                // changeable, not saveable, not namespace specific
                Ok(1 << 2)
            }
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn temperature_warning(&self) -> bool {
        TEMPERATURE > self.feat.temp_over || TEMPERATURE < self.feat.temp_under
    }

    fn set_features(&mut self, cmd: &Command) -> Res {
        let fid = (cmd.cdw10 & 0xff) as u8;
        if cmd.cdw10 & (1 << 31) != 0 {
            return Err(Status::FEATURE_NOT_SAVEABLE);
        }
        let v = cmd.cdw11;
        match fid {
            feat::ARBITRATION => self.feat.arbitration = v,
            feat::POWER_MGMT => {
                if v & 0x1f != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                self.feat.power_state = v & 0xff;
            }
            feat::TEMP_THRESH => {
                let tmpsel = (v >> 16) & 0xf;
                let thsel = (v >> 20) & 3;
                if tmpsel != 0 && tmpsel != 0xf {
                    return Err(Status::INVALID_FIELD);
                }
                let was = self.temperature_warning();
                match thsel {
                    0 => self.feat.temp_over = v as u16,
                    1 => self.feat.temp_under = v as u16,
                    _ => return Err(Status::INVALID_FIELD),
                }
                if !was && self.temperature_warning() && self.feat.aec & (1 << 1) != 0 {
                    self.sh.raise_event(Event {
                        kind: aer::TYPE_SMART,
                        info: aer::SMART_TEMPERATURE,
                        log: log_page::SMART,
                    });
                }
            }
            feat::ERROR_RECOVERY => self.feat.error_recovery = v & 0xffff,
            feat::VOLATILE_WC => self.sh.backend.set_write_cache(v & 1 != 0),
            feat::NUM_QUEUES => {
                let nsqr = v & 0xffff;
                let ncqr = v >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Err(Status::INVALID_FIELD);
                }
                if self.io_queues_created {
                    return Err(Status::COMMAND_SEQUENCE);
                }
                let max = u32::from(self.sh.cfg.max_io_queues);
                let nsq = (nsqr + 1).min(max) as u16;
                let ncq = (ncqr + 1).min(max) as u16;
                self.feat.queues = (nsq, ncq);
                return Ok((u32::from(ncq - 1) << 16) | u32::from(nsq - 1));
            }
            feat::IRQ_COALESCE => self.feat.irq_coalesce = v & 0xffff,
            feat::IRQ_CONFIG => {
                let iv = (v & 0xffff) as usize;
                let slot = self.feat.irq_cd.get_mut(iv).ok_or(Status::INVALID_FIELD)?;
                *slot = v & (1 << 16) != 0;
            }
            feat::WRITE_ATOMICITY => self.feat.write_atomicity = v & 1,
            feat::ASYNC_EVENT => self.feat.aec = v & (0xff | (1 << 8)),
            feat::KATO => {
                self.feat.kato = v;
                self.last_keep_alive = std::time::Instant::now();
            }
            _ => return Err(Status::INVALID_FIELD),
        }
        Ok(0)
    }

    fn smart_log(&self) -> Vec<u8> {
        let mut d = vec![0u8; 512];
        let mut warn = 0u8;
        if self.temperature_warning() {
            warn |= 1 << 1;
        }
        if self.sh.backend.read_only() {
            warn |= 1 << 3;
        }
        d[0] = warn;
        put(&mut d, 1, &TEMPERATURE.to_le_bytes());
        d[3] = 100; // available spare
        d[4] = 10; // spare threshold
        let mut rc = 0u128;
        let mut wc = 0u128;
        let mut rb = 0u128;
        let mut wb = 0u128;
        for s in &self.sh.stats {
            rc += u128::from(s.read_cmds.load(Ordering::Relaxed));
            wc += u128::from(s.write_cmds.load(Ordering::Relaxed));
            rb += u128::from(s.read_bytes.load(Ordering::Relaxed));
            wb += u128::from(s.write_bytes.load(Ordering::Relaxed));
        }
        // Data units: thousands of 512-byte units, rounded up.
        put(&mut d, 32, &(rb / 512).div_ceil(1000).to_le_bytes());
        put(&mut d, 48, &(wb / 512).div_ceil(1000).to_le_bytes());
        put(&mut d, 64, &rc.to_le_bytes());
        put(&mut d, 80, &wc.to_le_bytes());
        put(&mut d, 112, &1u128.to_le_bytes()); // power cycles
        let hours = u128::from(self.sh.started.elapsed().as_secs() / 3600);
        put(&mut d, 128, &hours.to_le_bytes());
        let errors = u128::from(super::ctrl::lock_errors(&self.sh).count);
        put(&mut d, 176, &errors.to_le_bytes());
        d
    }

    fn error_log(&self) -> Vec<u8> {
        let log = super::ctrl::lock_errors(&self.sh);
        let mut d = vec![0u8; ERROR_LOG_ENTRIES * 64];
        for (i, e) in log.entries.iter().enumerate() {
            put(&mut d, i * 64, e);
        }
        d
    }

    fn effects_log(&self) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        const CSUPP: u32 = 1;
        const LBCC: u32 = 1 << 1;
        const CCC: u32 = 1 << 4;
        let mut admin_cmds = vec![
            (admin::DELETE_SQ, CSUPP | CCC),
            (admin::CREATE_SQ, CSUPP | CCC),
            (admin::GET_LOG_PAGE, CSUPP),
            (admin::DELETE_CQ, CSUPP | CCC),
            (admin::CREATE_CQ, CSUPP | CCC),
            (admin::IDENTIFY, CSUPP),
            (admin::ABORT, CSUPP),
            (admin::SET_FEATURES, CSUPP),
            (admin::GET_FEATURES, CSUPP),
            (admin::ASYNC_EVENT, CSUPP),
            (admin::KEEP_ALIVE, CSUPP),
        ];
        if self.sh.cfg.doorbells == DoorbellMode::Trap {
            admin_cmds.push((admin::DBBUF_CONFIG, CSUPP));
        }
        for (op, e) in admin_cmds {
            put(&mut d, 4 * usize::from(op), &e.to_le_bytes());
        }
        for (op, e) in [
            (io::FLUSH, CSUPP),
            (io::WRITE, CSUPP | LBCC),
            (io::READ, CSUPP),
            (io::WRITE_ZEROES, CSUPP | LBCC),
            (io::DSM, CSUPP | LBCC),
        ] {
            put(&mut d, 1024 + 4 * usize::from(op), &e.to_le_bytes());
        }
        d
    }

    fn get_log_page(&mut self, g: &mut Guest<'_>, cmd: &Command) -> Res {
        let lid = (cmd.cdw10 & 0xff) as u8;
        let rae = cmd.cdw10 & (1 << 15) != 0;
        let numd = (u64::from(cmd.cdw11 & 0xffff) << 16 | u64::from(cmd.cdw10 >> 16)) + 1;
        let len = numd * 4;
        let offset = u64::from(cmd.cdw12) | (u64::from(cmd.cdw13) << 32);
        if offset % 4 != 0 {
            return Err(Status::INVALID_FIELD);
        }
        let (data, event_kind) = match lid {
            log_page::ERROR => (self.error_log(), Some(aer::TYPE_ERROR)),
            log_page::SMART => {
                if !matches!(cmd.nsid, 0 | NSID | NSID_ALL) {
                    return Err(Status::INVALID_FIELD);
                }
                (self.smart_log(), Some(aer::TYPE_SMART))
            }
            log_page::FW_SLOT => {
                let mut d = vec![0u8; 512];
                d[0] = 1; // active slot 1
                put_str(&mut d, 8, 8, &self.sh.cfg.firmware);
                (d, None)
            }
            log_page::CHANGED_NS => {
                let mut d = vec![0u8; 4096];
                for (i, n) in self.changed_ns.iter().take(1024).enumerate() {
                    put(&mut d, 4 * i, &n.to_le_bytes());
                }
                (d, Some(aer::TYPE_NOTICE))
            }
            log_page::CMD_EFFECTS => (self.effects_log(), None),
            _ => return Err(Status::INVALID_LOG_PAGE),
        };
        let size = data.len() as u64;
        if offset > size {
            return Err(Status::INVALID_FIELD);
        }
        let n = len.min(size - offset) as usize;
        let start = offset as usize;
        self.copy_to_host(g, cmd, &data[start..start + n])?;
        if !rae {
            if let Some(k) = event_kind {
                self.masked_events &= !(1 << k);
                if k == aer::TYPE_NOTICE {
                    self.changed_ns.clear();
                }
            }
        }
        Ok(0)
    }

    fn dbbuf_config(&mut self, cmd: &Command) -> Res {
        let (dbs, eis) = (cmd.dptr1, cmd.dptr2);
        let mask = self.page() - 1;
        if dbs == 0 || eis == 0 || dbs & mask != 0 || eis & mask != 0 {
            return Err(Status::INVALID_FIELD);
        }
        self.dbbuf = Some((dbs, eis));
        self.sh.shadow.store(dbs, Ordering::Release);
        for (w, ctl) in self.sh.ctl.iter().enumerate() {
            ctl.submit(&self.sh, w, Control::Dbbuf(Some((dbs, eis))));
        }
        log::debug!("nvme: shadow doorbells at {dbs:#x}, event indexes at {eis:#x}");
        Ok(0)
    }
}
