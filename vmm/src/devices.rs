//! Port-I/O devices: the 16550 console (vm-superio) on COM1 / IRQ 4, a small
//! i8042 (so a guest reset through the keyboard controller ends the VM), and
//! the catch-all for ports nobody owns. PIT, PIC, IOAPIC and LAPIC live in
//! KVM (in-kernel irqchip).

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{Persist, StateError};
use crate::virtio::{TransportState, VirtioDevices};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// COM1's legacy IRQ (GSI).
pub const COM1_GSI: u32 = 4;

/// Raises IRQ 4 through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Something the devices report to the VM's controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The guest asked for a reset (i8042 pulse): the VM ends.
    Reset,
}

/// Where the console's output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Serial output a guest may write to a file before the rest is dropped: a guest must not
/// fill the host's disk through its console.
pub const SERIAL_FILE_CAP: u64 = 256 << 20;

/// A writer that takes at most `cap` bytes, then drops the rest (saying so once, in the file
/// and the log).
pub struct Capped<W> {
    inner: W,
    left: u64,
    cap: u64,
}

impl<W: Write> Capped<W> {
    /// `inner`, taking at most `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Capped<W> {
        Capped {
            inner,
            left: cap,
            cap,
        }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(buf.len());
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.write(&buf[..n])?;
        self.left -= n as u64;
        if self.left == 0 {
            let _ = writeln!(
                self.inner,
                "\n[vmm: serial output reached {} MiB; the rest is dropped]",
                self.cap >> 20
            );
            let _ = self.inner.flush();
            log::warn!(
                "the guest's serial output reached {} MiB: the rest is dropped",
                self.cap >> 20
            );
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The console: a 16550 UART.
pub struct Console {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl Console {
    /// A fresh console raising `irq`, writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Console {
        Console {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    fn write(&mut self, offset: u8, v: u8) {
        if let Err(e) = self.serial.write(offset, v) {
            log::debug!("serial write at +{offset}: {e:?}");
        }
        let _ = self.serial.writer_mut().flush();
    }
}

/// Saved console: the UART registers and the input not yet read by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Pending input.
    pub in_buffer: Vec<u8>,
}

/// The saved form of vm-superio's UART state.
impl From<SerialState> for ConsoleState {
    fn from(s: SerialState) -> ConsoleState {
        ConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// The UART as it comes out of reset (vm-superio's initial state): 9600 baud, 8N1, the
/// transmitter empty, OUT2 set, CTS/DSR/DCD up, no input.
impl Default for ConsoleState {
    fn default() -> ConsoleState {
        SerialState::default().into()
    }
}

impl Persist for Console {
    type State = ConsoleState;
    type Args = (EventFd, ConsoleOut);
    type Error = StateError;

    fn save(&self) -> Result<ConsoleState, StateError> {
        Ok(self.serial.state().into())
    }

    fn restore((irq, out): Self::Args, s: &ConsoleState) -> Result<Console, StateError> {
        let st = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&st, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| StateError::Invalid(format!("serial state: {e:?}")))?;
        Ok(Console { serial })
    }
}

/// A minimal i8042 keyboard controller: command byte, one-byte output
/// buffer, and the 0xFE reset pulse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    /// Controller command byte.
    pub command_byte: u8,
    /// Byte waiting on port 0x60.
    pub output: Option<u8>,
    /// Last command that expects a data byte on port 0x60.
    pub pending_command: Option<u8>,
}

impl I8042 {
    fn read(&mut self, port: u16) -> u8 {
        match port {
            0x60 => self.output.take().unwrap_or(0),
            0x64 => u8::from(self.output.is_some()),
            _ => 0xff,
        }
    }

    fn write(&mut self, port: u16, v: u8) -> Option<DeviceEvent> {
        match (port, v) {
            (0x64, 0xfe) => return Some(DeviceEvent::Reset),
            (0x64, 0x20) => self.output = Some(self.command_byte),
            (0x64, 0x60) => self.pending_command = Some(0x60),
            (0x64, 0xaa) => self.output = Some(0x55),
            (0x64, 0xd1) => self.pending_command = Some(0xd1),
            (0x64, _) => {}
            (0x60, _) => match self.pending_command.take() {
                Some(0x60) => self.command_byte = v,
                // Output port write: bit 0 low pulses the CPU reset line.
                Some(0xd1) if v & 1 == 0 => return Some(DeviceEvent::Reset),
                _ => {}
            },
            _ => {}
        }
        None
    }
}

impl Persist for I8042 {
    type State = I8042;
    type Args = ();
    type Error = StateError;
    fn save(&self) -> Result<I8042, StateError> {
        Ok(self.clone())
    }
    fn restore(_: (), s: &I8042) -> Result<I8042, StateError> {
        Ok(s.clone())
    }
}

/// Every port-I/O device of the VM, shared by the vCPU threads.
pub struct Devices {
    /// COM1.
    pub console: Mutex<Console>,
    /// Keyboard controller.
    pub i8042: Mutex<I8042>,
    /// virtio-mmio devices.
    pub virtio: VirtioDevices,
    events: Sender<DeviceEvent>,
}

/// Saved devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub console: ConsoleState,
    /// Keyboard controller.
    pub i8042: I8042,
    /// virtio devices.
    pub virtio: Vec<TransportState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Devices {
    /// Fresh devices.
    pub fn new(console: Console, virtio: VirtioDevices, events: Sender<DeviceEvent>) -> Devices {
        Devices {
            console: Mutex::new(console),
            i8042: Mutex::new(I8042::default()),
            virtio,
            events,
        }
    }

    /// A port read of `data.len()` bytes.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff => {
                let v = lock(&self.console).serial.read((port - COM1) as u8);
                data.fill(0);
                data[0] = v;
            }
            0x60 | 0x64 => {
                let v = lock(&self.i8042).read(port);
                data.fill(0);
                data[0] = v;
            }
            _ => data.fill(0xff),
        }
    }

    /// An MMIO read; false if no device owns `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.virtio.mmio(addr, Some(data), None)
    }

    /// An MMIO write; false if no device owns `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.virtio.mmio(addr, None, Some(data))
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match port {
            COM1..=0x3ff => lock(&self.console).write((port - COM1) as u8, v),
            0x60 | 0x64 => {
                if let Some(ev) = lock(&self.i8042).write(port, v) {
                    let _ = self.events.send(ev);
                }
            }
            _ => {}
        }
    }

    /// Saves both devices.
    pub fn save(&self) -> Result<DevicesState, StateError> {
        Ok(DevicesState {
            console: lock(&self.console).save()?,
            i8042: lock(&self.i8042).save()?,
            virtio: self
                .virtio
                .save()
                .map_err(|e| StateError::Invalid(e.to_string()))?,
        })
    }

    /// Rebuilds the devices from `state`.
    pub fn restore(
        state: &DevicesState,
        irq: EventFd,
        out: ConsoleOut,
        virtio: VirtioDevices,
        events: Sender<DeviceEvent>,
    ) -> Result<Devices, StateError> {
        Ok(Devices {
            console: Mutex::new(Console::restore((irq, out), &state.console)?),
            i8042: Mutex::new(I8042::restore((), &state.i8042)?),
            virtio,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_pulse_and_command_byte() {
        let mut k = I8042::default();
        assert_eq!(k.write(0x64, 0x60), None);
        assert_eq!(k.write(0x60, 0x47), None);
        assert_eq!(k.write(0x64, 0x20), None);
        assert_eq!(k.read(0x64), 1);
        assert_eq!(k.read(0x60), 0x47);
        assert_eq!(k.write(0x64, 0xfe), Some(DeviceEvent::Reset));
    }

    #[test]
    fn console_state_round_trips_pending_input() {
        let mut c = Console::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        assert_eq!(c.input(b"qx"), 2);
        let s = c.save().unwrap();
        assert_eq!(s.in_buffer, b"qx");
        let mut r =
            Console::restore((EventFd::new(0).unwrap(), Box::new(std::io::sink())), &s).unwrap();
        assert_eq!(r.save().unwrap(), s);
        assert_eq!(r.serial.read(0), b'q');
    }
}

#[cfg(test)]
mod capped_tests {
    use super::*;

    #[test]
    fn serial_output_past_the_cap_is_dropped_with_one_note() {
        let mut c = Capped::new(Vec::new(), 10);
        for _ in 0..100 {
            c.write_all(b"abcd").unwrap();
        }
        let text = String::from_utf8(c.inner).unwrap();
        assert!(
            text.starts_with("abcdabcdab\n[vmm: serial output reached"),
            "{text}"
        );
        assert_eq!(text.matches("[vmm:").count(), 1);
    }
}
